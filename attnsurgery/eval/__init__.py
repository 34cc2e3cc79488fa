"""Measuring a (patched) model: built on the core, never imported by it.

* :mod:`.lmeval` -- the lm-evaluation-harness bridge (``--model attnsurgery``, ``attnsurgery lm-eval``).
* :mod:`.text` / :mod:`.text_results` / :mod:`.text_report` / :mod:`.text_tables` -- baseline vs patched
  through lm-eval: the runs, the arms' results and paired deltas, their markdown and plots, table definitions
  (``attnsurgery eval`` / ``reproduce``).
* :mod:`.vision` / :mod:`.vision_tables` / :mod:`.vision_metrics` -- POPE and CHAIR for vision-language models
  (``kind: vlm`` tables).
* :mod:`.scoring` -- choice log-likelihoods and text-window loss, shared by the tables and by calibration.
* :mod:`.report` -- the one renderer (markdown, JSON, PNG) of text and vision tables.
* :mod:`.outliers` / :mod:`.outliers_report`, :mod:`.quant` -- activation-outlier statistics (measured; their
  table and plot) and low-precision checks.
* :mod:`.training_table` / :mod:`.training_table_def` / :mod:`.training_table_report` -- ``kind: training``
  tables: train each arm, then measure it on the test split (the run; the YAML definition; ``table.md`` and the
  validation curves).
* :mod:`.budget` / :mod:`.budget_def` / :mod:`.budget_report` -- ``kind: budget`` tables: trained surgeries
  against their training budget (the runner and shipping; the YAML definition; the curve, its plot and the
  extrapolation). :mod:`.longctx` -- long-context perplexity and passkey retrieval of a state.

Submodules are imported on use (``lm_eval`` and ``torch`` are heavy), e.g.
``from attnsurgery.eval.text import evaluate_arms, make_arms``.
"""
