"""A sweep of bad inputs through every CLI subcommand and the Python API (issue 27, "what a user meets").

    .venv/bin/python evals/bad_inputs.py [--out FILE] [--jobs 2] [-k SUBSTRING ...] [--no-load] [--subprocess]

(default --out evals/results/bad_inputs/results.md, with every case as JSON beside it; about 5 minutes with --jobs 2
on a 2-core CPU).

Each case is a bad input a user could plausibly type. The project standard it checks: a clear error that names the
bad value (and the fix), before any model loads where possible; no traceback reaches a CLI user (and no bare
exception other than an ``AttnSurgeryError`` leaves the API); nothing half-written or overwritten without
``--overwrite``. Per case it records the exit code (CLI) or the exception (API), whether "Traceback" reached the
user, whether the message names the bad value (every pattern the case lists is found), whether the bad input was
silently accepted (exit 0 / no exception), and whether files in the sandbox changed.

CLI cases run ``.venv/bin/attnsurgery`` as a subprocess in a fresh sandbox (a tiny random Llama saved to a folder,
fixture files, ``ATTNSURGERY_CACHE`` inside the sandbox); API cases run in one worker process on the tiny model.
Only a few cases load the packaged ``smollm2-135m`` (marked ``loads``). Verdicts:

- ``ok``: refused, the message names the bad value, no traceback, nothing written
- ``traceback``: "Traceback" reached the user
- ``bug``: the CLI's catch-all ("unexpected error", exit 1) or, in the API, an exception that is not an
  ``AttnSurgeryError`` (a bare TypeError, KeyError ...)
- ``silent``: the bad input was accepted (exit 0 / no exception)
- ``unclear``: refused, but the message does not name the bad value
- ``wrote``: refused, but a file was written or replaced
- ``code``: refused clearly, but with another exit code than the documented one
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = str(ROOT / ".venv" / "bin" / "attnsurgery")
PY = str(ROOT / ".venv" / "bin" / "python")


@dataclass
class Case:
    id: str
    category: str
    argv: list[str] | None = None  # CLI
    code: str | None = None  # API: Python statements run with m (tiny model), tmp (sandbox), the API names
    expect: list[str] = field(default_factory=list)  # regexes the message must hold (the bad value / the fix)
    exit: int | None = None  # the documented exit code
    loads: bool = False  # loads smollm2-135m (slow)
    stdin: str | None = None


T = "{tiny}"  # the tiny model folder
S = "{tmp}"  # the sandbox


def cli_cases() -> list[Case]:
    c: list[Case] = []

    def add(id, category, argv, expect, exit=None, loads=False):
        c.append(Case(id, category, argv=argv, expect=expect, exit=exit, loads=loads))

    # -- the top level ------------------------------------------------------------------------------------------------
    add("no-command", "cli", [], ["command"], 2)
    add("unknown-command", "cli", ["aply"], ["aply", "invalid choice"], 2)
    add("list-extra-positional", "list", ["list", "surgeries"], ["surgeries"], 2)
    add("list-unknown-option", "list", ["list", "--verbosee"], ["--verbosee"], 2)
    # -- apply: names -------------------------------------------------------------------------------------------------
    add("apply-surgery-typo", "apply/names", ["apply", "tempreature", T], ["tempreature", "temperature"], 3)
    add("apply-surgery-empty", "apply/names", ["apply", "", T], ["unknown surgery ''|surgery"], 3)
    add("apply-surgery-only", "apply/names", ["apply", "temperature"], ["SURGERY MODEL"], 2)
    add(
        "apply-three-positionals",
        "apply/names",
        ["apply", "temperature", T, "extra"],
        ["extra|SURGERY MODEL"],
        2,
    )
    add(
        "apply-model-alias-typo",
        "apply/names",
        ["apply", "temperature", "smollm2-13m"],
        ["smollm2-13m", "smollm2-135m"],
        7,
    )
    add("apply-model-empty", "apply/names", ["apply", "temperature", ""], ["''|empty"], 7)
    add(
        "apply-model-missing-path",
        "apply/names",
        ["apply", "temperature", "./no/such/model"],
        ["no/such/model"],
        7,
    )
    add(
        "apply-model-is-file",
        "apply/names",
        ["apply", "temperature", f"{S}/a-file.txt"],
        ["a-file.txt", "is a file|not a folder"],
        7,
    )
    add("apply-model-empty-dir", "apply/names", ["apply", "temperature", f"{S}/emptydir"], ["emptydir"], 7)
    add(
        "apply-recipe-typo",
        "apply/names",
        ["apply", "--recipe", "temprature", T],
        ["temprature", "temperature"],
        5,
    )
    add("apply-recipe-empty", "apply/names", ["apply", "--recipe", "", T], ["--recipe|recipe ''"], 5)
    add("apply-recipe-no-model", "apply/names", ["apply", "--recipe", "temperature"], ["MODEL"], 2)
    add(
        "apply-recipe-and-surgery",
        "apply/conflict",
        ["apply", "--recipe", "temperature", "head_scale", T],
        ["head_scale"],
        2,
    )
    add(
        "apply-recipe-sub-typo",
        "apply/names",
        ["apply", "--recipe", "temperature/positon", T],
        ["positon", "position"],
        5,
    )
    add(
        "apply-act-no-calibrate",
        "apply/names",
        ["apply", "--recipe", "act", T, "--no-calibrate"],
        ["act", "calibrat"],
        5,
    )
    # -- apply: surgery arguments ---------------------------------------------------------------------------------
    add(
        "apply-arg-tau-zero",
        "apply/args",
        ["apply", "temperature", T, "--arg", "tau=0"],
        ["tau=0", r"\(0(\.0)?, inf"],
        4,
    )
    add("apply-arg-tau-inf", "apply/args", ["apply", "temperature", T, "--arg", "tau=inf"], ["tau=inf"], 4)
    add(
        "apply-arg-tau-list-word",
        "apply/args",
        ["apply", "temperature", T, "--arg", "tau=[a, b]"],
        ["tau="],
        4,
    )
    add(
        "apply-arg-empty-name",
        "apply/args",
        ["apply", "temperature", T, "--arg", "=0.8"],
        ["=0.8", "name"],
        2,
    )
    add(
        "apply-arg-twice",
        "apply/args",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--arg", "tau=0.9"],
        ["tau", "twice|more than once|both"],
        2,
    )
    add(
        "apply-arg-space-in-name", "apply/args", ["apply", "temperature", T, "--arg", "t au=0.8"], ["t au"], 4
    )
    add(
        "apply-arg-layers-and-layers",
        "apply/conflict",
        ["apply", "temperature", T, "--arg", "layers=0", "--layers", "1"],
        ["layers"],
        2,
    )
    add(
        "apply-arg-beta-act-word", "apply/args", ["apply", "act", T, "--arg", "beta=high"], ["beta='high'"], 4
    )
    add(
        "apply-arg-moh-top-k-99",
        "apply/args",
        ["apply", "moh", T, "--arg", "top_k=99", "--prompt", "x"],
        ["top_k", "99"],
        4,
    )
    add(
        "apply-arg-hedgehog-window-zero",
        "apply/args",
        ["apply", "hedgehog", T, "--arg", "window=0"],
        ["window"],
        4,
    )
    add(
        "apply-arg-lora-targets-typo",
        "apply/args",
        ["apply", "lora", T, "--arg", "targets=q_prj", "--prompt", "x"],
        ["q_prj", "q_proj"],
        4,
    )
    add(
        "apply-arg-finetune-typo",
        "apply/args",
        ["apply", "finetune", T, "--arg", "targets=o_prj", "--prompt", "x"],
        ["o_prj", "o_proj"],
        4,
    )
    add(
        "apply-arg-gated-form-empty",
        "apply/args",
        ["apply", "gated_attention", T, "--arg", "form="],
        ["form"],
        4,
    )
    add(
        "apply-arg-clipped-zeta-inf",
        "apply/args",
        ["apply", "clipped_softmax", T, "--arg", "zeta=.inf"],
        ["zeta"],
        4,
    )
    add("apply-arg-reweight-p-negative", "apply/args", ["apply", "reweight", T, "--arg", "p=-2"], ["p=-2"], 4)
    add(
        "apply-arg-tau-per-layer-typo",
        "apply/args",
        ["apply", "temperature", T, "--arg", "tau={x: 0.5}", "--prompt", "x"],
        ["x", "layer"],
        4,
    )
    add(
        "apply-arg-tau-per-layer-99",
        "apply/args",
        ["apply", "temperature", T, "--arg", "tau={99: 0.5}", "--prompt", "x"],
        ["99"],
        4,
    )
    add("apply-var-text-model", "apply/args", ["apply", "var", T, "--prompt", "x"], ["vision"], 6)
    # -- apply: layers and heads ----------------------------------------------------------------------------------
    add(
        "apply-layers-40:2",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--layers", "40:2"],
        ["40:2"],
        4,
    )
    add(
        "apply-layers-empty",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--layers", ""],
        ["layers", "''"],
        4,
    )
    add(
        "apply-layers-float",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--layers", "1.5"],
        ["1.5"],
        4,
    )
    add(
        "apply-layers-word",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--layers", "all-but-one"],
        ["all-but-one"],
        4,
    )
    add(
        "apply-layers-list-bad",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--layers", "0,x"],
        ["'x'"],
        4,
    )
    add(
        "apply-layers-reversed-empty",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--layers", "1:3:-1", "--prompt", "x"],
        ["1:3:-1"],
        4,
    )
    add(
        "apply-heads-99-layer",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--heads", "{99: [0]}"],
        ["99"],
        4,
    )
    add(
        "apply-heads-99-head",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--heads", "{0: [99]}"],
        ["99"],
        4,
    )
    add(
        "apply-heads-word",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--heads", "first"],
        ["first"],
        4,
    )
    add(
        "apply-heads-empty-list",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--heads", "[]"],
        ["empty"],
        4,
    )
    add(
        "apply-heads-empty-string",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--heads", ""],
        ["heads"],
        4,
    )
    add(
        "apply-heads-key-word",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--heads", "{a: [0]}"],
        ["'a'"],
        4,
    )
    add(
        "apply-heads-nested",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--heads", "[[0, 1]]"],
        [r"\[0, 1\]"],
        4,
    )
    add(
        "apply-heads-outside-layers",
        "apply/targets",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--layers", "0", "--heads", "{2: [0]}"],
        ["outside"],
        4,
    )
    # -- apply: numbers and options -------------------------------------------------------------------------------
    add(
        "apply-max-new-tokens-zero",
        "apply/options",
        ["apply", "temperature", T, "--max-new-tokens", "0"],
        ["--max-new-tokens", "0"],
        2,
    )
    add(
        "apply-max-new-tokens-word",
        "apply/options",
        ["apply", "temperature", T, "--max-new-tokens", "ten"],
        ["ten"],
        2,
    )
    add(
        "apply-max-new-tokens-float",
        "apply/options",
        ["apply", "temperature", T, "--max-new-tokens", "2.5"],
        ["2.5"],
        2,
    )
    add(
        "apply-dtype-typo", "apply/options", ["apply", "temperature", T, "--dtype", "float33"], ["float33"], 2
    )
    add("apply-dtype-empty", "apply/options", ["apply", "temperature", T, "--dtype", ""], ["dtype"], 2)
    add(
        "apply-device-map-bogus",
        "apply/options",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--device-map", "gpu9", "--prompt", "x"],
        ["gpu9"],
        2,
    )
    add(
        "apply-prompt-empty",
        "apply/options",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--prompt", ""],
        ["prompt"],
        2,
    )
    add("apply-unknown-option", "apply/options", ["apply", "temperature", T, "--tau", "0.8"], ["--tau"], 2)
    # -- apply: output files --------------------------------------------------------------------------------------
    add(
        "apply-save-onto-saved",
        "apply/files",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--save", f"{S}/saved"],
        ["overwrite"],
        2,
    )
    add(
        "apply-save-under-file",
        "apply/files",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--save", f"{S}/a-file.txt/out"],
        ["a-file.txt"],
        2,
    )
    add(
        "apply-save-empty",
        "apply/files",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--save", ""],
        ["--save"],
        2,
    )
    add(
        "apply-save-proc",
        "apply/files",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--save", "/proc/attnsurgery-out"],
        ["/proc/attnsurgery-out"],
        2,
    )
    add(
        "apply-overwrite-without-save",
        "apply/conflict",
        ["apply", "temperature", T, "--arg", "tau=0.8", "--overwrite", "--prompt", "x"],
        ["--overwrite", "--save"],
        2,
    )
    # -- recipes: YAML files ------------------------------------------------------------------------------------------
    for name, expect in [
        ("empty", ["empty"]),
        ("list", ["mapping"]),
        ("badyaml", ["YAML"]),
        ("tabs", ["YAML"]),
        ("binary", ["binary.yaml", "UTF-8|text"]),
        ("dupkey", ["surgeries", "twice|duplicate|more than once"]),
        ("dup-arg", ["tau", "twice|duplicate|more than once"]),
        ("nosurgeries", ["surgeries"]),
        ("emptysurgeries", ["surgeries"]),
        ("args-list", ["args"]),
        ("surgery-number", ["'5'|5"]),
        ("surgery-null", ["surgery"]),
        ("unknown-key", ["modle", "model"]),
        ("entry-unknown-key", ["arg", "args"]),
        ("tau-zero", ["tau=0"]),
        ("layers-40-2", ["40:2"]),
        ("heads-99", ["99"]),
        ("state-dir", ["statedir", "folder|directory"]),
        ("state-missing", ["gone.safetensors"]),
        ("state-not-safetensors", ["not-st.safetensors"]),
        ("eval-list", ["eval"]),
        ("model-list", ["model"]),
        ("name-mapping", ["name"]),
    ]:
        add(
            f"recipe-{name}",
            "recipe",
            ["apply", "--recipe", f"{S}/recipes/{name}.yaml", T, "--prompt", "x"],
            expect,
            5,
        )
    add("recipe-is-dir-yaml", "recipe", ["apply", "--recipe", f"{S}/dir.yaml", T], ["dir.yaml"], 5)
    add(
        "recipe-folder-no-yaml",
        "recipe",
        ["apply", "--recipe", f"{S}/emptydir", T],
        ["emptydir", "recipe.yaml"],
        5,
    )
    add(
        "recipe-for-7b-on-tiny",
        "recipe",
        ["apply", "--recipe", "act/llama2-7b-chat", T, "--prompt", "x"],
        ["out of range"],
        5,
    )
    add(
        "recipe-override-multi",
        "recipe",
        ["apply", "--recipe", f"{S}/recipes/two.yaml", T, "--arg", "tau=0.8", "--prompt", "x"],
        ["2 surgeries|ambiguous"],
        5,
    )
    # -- inspect ----------------------------------------------------------------------------------------------------
    add(
        "inspect-surgery-typo",
        "inspect",
        ["inspect", T, "--surgery", "tempreature"],
        ["tempreature", "temperature"],
        3,
    )
    add(
        "inspect-arg-without-surgery",
        "inspect",
        ["inspect", T, "--arg", "tau=0.8", "--out", f"{S}/new/a.png"],
        ["--arg", "--surgery|--recipe"],
        2,
    )
    add(
        "inspect-layers-without-surgery",
        "inspect",
        ["inspect", T, "--layers", "2:", "--out", f"{S}/new/a.png"],
        ["--layers", "--surgery|--recipe"],
        2,
    )
    add(
        "inspect-surgery-and-recipe",
        "inspect",
        ["inspect", T, "--surgery", "head_scale", "--recipe", "temperature", "--out", f"{S}/new/a.png"],
        ["--surgery", "--recipe"],
        2,
    )
    add(
        "inspect-heads-shown-zero", "inspect", ["inspect", T, "--heads-shown", "0"], ["--heads-shown", "0"], 2
    )
    add("inspect-threshold-two", "inspect", ["inspect", T, "--threshold", "2"], ["--threshold", "2"], 2)
    add(
        "inspect-show-layers-40:2",
        "inspect",
        ["inspect", T, "--show-layers", "40:2", "--out", f"{S}/new/a.png"],
        ["40:2"],
        4,
    )
    add(
        "inspect-show-layers-word",
        "inspect",
        ["inspect", T, "--show-layers", "top", "--out", f"{S}/new/a.png"],
        ["top"],
        4,
    )
    add(
        "inspect-out-under-file",
        "inspect",
        ["inspect", T, "--out", f"{S}/a-file.txt/maps.png"],
        ["a-file.txt"],
        2,
    )
    add(
        "inspect-out-exists",
        "inspect",
        ["inspect", T, "--out", f"{S}/existing.png"],
        ["existing.png", "--overwrite"],
        2,
    )
    add("inspect-out-is-dir", "inspect", ["inspect", T, "--out", f"{S}/emptydir"], ["emptydir"], 2)
    add(
        "inspect-prompt-empty",
        "inspect",
        ["inspect", T, "--prompt", "", "--out", f"{S}/new/a.png"],
        ["prompt"],
        2,
    )
    add(
        "inspect-outliers-windows-zero",
        "inspect",
        ["inspect", T, "--outliers", "--windows", "0"],
        ["--windows"],
        2,
    )
    add(
        "inspect-outliers-seq-len-4",
        "inspect",
        ["inspect", T, "--outliers", "--seq-len", "4"],
        ["--seq-len"],
        2,
    )
    add(
        "inspect-outliers-data-typo",
        "inspect",
        ["inspect", T, "--outliers", "--data", "gutenberg_pp", "--out", f"{S}/new/o"],
        ["gutenberg_pp"],
        2,
    )
    add(
        "inspect-outliers-test-split",
        "inspect",
        ["inspect", T, "--outliers", "--data", "gutenberg_ppl:test", "--out", f"{S}/new/o"],
        ["test"],
        2,
    )
    add(
        "inspect-outliers-seq-len-long",
        "inspect",
        ["inspect", T, "--outliers", "--seq-len", "100000", "--out", f"{S}/new/o"],
        ["100000"],
        2,
    )
    add(
        "inspect-outliers-out-file",
        "inspect",
        ["inspect", T, "--outliers", "--out", f"{S}/a-file.txt", "--windows", "1", "--seq-len", "16"],
        ["a-file.txt"],
        2,
    )
    add(
        "inspect-outliers-recipe-typo",
        "inspect",
        ["inspect", T, "--outliers", "--recipe", "actt"],
        ["actt"],
        5,
    )
    # -- eval -------------------------------------------------------------------------------------------------------
    add("eval-no-tasks", "eval", ["eval", T], ["--tasks"], 2)
    add("eval-task-typo", "eval", ["eval", T, "--tasks", "bb_emoji_movi"], ["bb_emoji_movi"], 2)
    add("eval-tasks-empty", "eval", ["eval", T, "--tasks", ""], ["--tasks"], 2)
    add("eval-tasks-comma", "eval", ["eval", T, "--tasks", ","], ["--tasks"], 2)
    add("eval-limit-word", "eval", ["eval", T, "--tasks", "bb_emoji_movie", "--limit", "all"], ["all"], 2)
    add(
        "eval-limit-fraction-above-one",
        "eval",
        ["eval", T, "--tasks", "bb_emoji_movie", "--limit", "1.5"],
        ["1.5"],
        2,
    )
    add("eval-limit-nan", "eval", ["eval", T, "--tasks", "bb_emoji_movie", "--limit", "nan"], ["nan"], 2)
    add(
        "eval-recipe-typo",
        "eval",
        ["eval", T, "--tasks", "bb_emoji_movie", "--recipe", "temprature"],
        ["temprature"],
        5,
    )
    add(
        "eval-recipe-act-no-calibrate",
        "eval",
        ["eval", T, "--tasks", "bb_emoji_movie", "--recipe", "act", "--no-calibrate"],
        ["act"],
        5,
    )
    add("eval-quant-typo", "eval", ["eval", T, "--tasks", "bb_emoji_movie", "--quant", "w4a4"], ["w4a4"], 2)
    add(
        "eval-out-is-file",
        "eval",
        ["eval", T, "--tasks", "bb_emoji_movie", "--limit", "2", "--out", f"{S}/a-file.txt"],
        ["a-file.txt"],
        2,
    )
    add(
        "eval-out-empty",
        "eval",
        ["eval", T, "--tasks", "bb_emoji_movie", "--limit", "2", "--out", ""],
        ["--out"],
        2,
    )
    add(
        "eval-batch-size-word",
        "eval",
        ["eval", T, "--tasks", "bb_emoji_movie", "--batch-size", "auto"],
        ["auto"],
        2,
    )
    add("eval-dtype-typo", "eval", ["eval", T, "--tasks", "bb_emoji_movie", "--dtype", "fp33"], ["fp33"], 2)
    add("eval-model-typo", "eval", ["eval", "smollm-135m", "--tasks", "bb_emoji_movie"], ["smollm-135m"], 7)
    # -- reproduce ----------------------------------------------------------------------------------------------------
    add("reproduce-missing", "reproduce", ["reproduce", "evals/minii.yaml"], ["minii.yaml"], 2)
    add("reproduce-dir", "reproduce", ["reproduce", f"{S}/emptydir"], ["emptydir"], 2)
    add("reproduce-not-mapping", "reproduce", ["reproduce", f"{S}/recipes/list.yaml"], ["list.yaml"], 2)
    add(
        "reproduce-bad-yaml",
        "reproduce",
        ["reproduce", f"{S}/recipes/badyaml.yaml"],
        ["badyaml.yaml", "YAML"],
        2,
    )
    add("reproduce-empty-file", "reproduce", ["reproduce", f"{S}/recipes/empty.yaml"], ["empty.yaml"], 2)
    add("reproduce-binary", "reproduce", ["reproduce", f"{S}/recipes/binary.yaml"], ["binary.yaml"], 2)
    add(
        "reproduce-table-unknown-key",
        "reproduce",
        ["reproduce", f"{S}/table-typo.yaml"],
        ["modles", "models"],
        2,
    )
    add(
        "reproduce-model-not-in-table",
        "reproduce",
        ["reproduce", "{repo}/evals/mini.yaml", "--model", "smollm2-13m", "--out", f"{S}/new/r"],
        ["smollm2-13m"],
        2,
    )
    add(
        "reproduce-limit-zero",
        "reproduce",
        ["reproduce", "{repo}/evals/mini.yaml", "--limit", "0"],
        ["--limit"],
        2,
    )
    # -- calibrate ----------------------------------------------------------------------------------------------------
    add("calibrate-no-method", "calibrate", ["calibrate"], ["act|method"], 2)
    add("calibrate-method-typo", "calibrate", ["calibrate", "actt", T], ["actt"], 2)
    add("calibrate-act-no-data", "calibrate", ["calibrate", "act", T], ["--data"], 2)
    add(
        "calibrate-act-data-typo",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowldge"],
        ["bb_general_knowldge", "bb_general_knowledge"],
        2,
    )
    add(
        "calibrate-act-data-wrong-kind",
        "calibrate",
        ["calibrate", "act", T, "--data", "gutenberg_ppl"],
        ["gutenberg_ppl"],
        2,
    )
    add(
        "calibrate-act-data-missing-jsonl",
        "calibrate",
        ["calibrate", "act", T, "--data", f"{S}/none.jsonl"],
        ["none.jsonl"],
        2,
    )
    add(
        "calibrate-act-data-bad-jsonl",
        "calibrate",
        ["calibrate", "act", T, "--data", f"{S}/bad.jsonl"],
        ["bad.jsonl"],
        2,
    )
    add(
        "calibrate-act-data-wrong-records",
        "calibrate",
        ["calibrate", "act", T, "--data", f"{S}/norecords.jsonl", "--out", f"{S}/new/a.yaml"],
        ["norecords.jsonl"],
        2,
    )
    add(
        "calibrate-act-beta-two",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowledge", "--beta", "2"],
        ["beta", "2"],
        4,
    )
    add(
        "calibrate-act-batch-zero",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowledge", "--batch-size", "0"],
        ["--batch-size|batch_size", "0"],
        2,
    )
    add(
        "calibrate-act-limit-negative",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowledge", "--limit", "-5"],
        ["--limit|limit", "-5"],
        2,
    )
    add(
        "calibrate-act-confidence",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowledge", "--confidence", "1.5"],
        ["confidence", "1.5"],
        2,
    )
    add(
        "calibrate-act-heads-unclosed",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowledge", "--heads", "[0,"],
        ["heads", r"\[0,"],
        4,
    )
    add(
        "calibrate-act-layers-40:2",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowledge", "--layers", "40:2", "--limit", "4"],
        ["40:2"],
        4,
    )
    add(
        "calibrate-act-out-exists",
        "calibrate",
        [
            "calibrate",
            "act",
            T,
            "--data",
            "bb_general_knowledge",
            "--limit",
            "2",
            "--layers",
            "0",
            "--heads",
            "[0]",
            "--out",
            f"{S}/existing.yaml",
        ],
        ["existing.yaml", "--overwrite|exists"],
        2,
    )
    add(
        "calibrate-act-rule-typo",
        "calibrate",
        ["calibrate", "act", T, "--data", "bb_general_knowledge", "--rule", "fdrr"],
        ["fdrr"],
        2,
    )
    add(
        "calibrate-temperature-steps-zero",
        "calibrate",
        ["calibrate", "temperature", T, "--data", "gutenberg_ppl", "--steps", "0"],
        ["--steps", "0"],
        2,
    )
    add(
        "calibrate-temperature-lr-negative",
        "calibrate",
        ["calibrate", "temperature", T, "--data", "gutenberg_ppl", "--lr", "-1"],
        ["--lr", "-1"],
        2,
    )
    add(
        "calibrate-temperature-heldout",
        "calibrate",
        ["calibrate", "temperature", T, "--data", "gutenberg_ppl", "--heldout-fraction", "1.5"],
        ["--heldout-fraction", "1.5"],
        2,
    )
    add(
        "calibrate-temperature-seq-len-zero",
        "calibrate",
        ["calibrate", "temperature", T, "--data", "gutenberg_ppl", "--seq-len", "0"],
        ["--seq-len", "0"],
        2,
    )
    add(
        "calibrate-temperature-wrong-kind",
        "calibrate",
        ["calibrate", "temperature", T, "--data", "bb_general_knowledge"],
        ["bb_general_knowledge"],
        2,
    )
    add(
        "calibrate-temperature-out-exists",
        "calibrate",
        [
            "calibrate",
            "temperature",
            T,
            "--data",
            "gutenberg_ppl",
            "--out",
            f"{S}/existing.yaml",
            "--steps",
            "1",
            "--limit",
            "4",
            "--seq-len",
            "16",
        ],
        ["existing.yaml", "--overwrite|exists"],
        2,
    )
    add("calibrate-var-no-sink-channel", "calibrate", ["calibrate", "var", T], ["channel", "tau"], 4)
    add("calibrate-var-tau-negative", "calibrate", ["calibrate", "var", T, "--tau", "-1"], ["--tau", "-1"], 2)
    # -- train --------------------------------------------------------------------------------------------------------
    add("train-no-out", "train", ["train", T, "head_scale"], ["--out"], 2)
    add(
        "train-surgery-typo",
        "train",
        ["train", T, "head_scal", "--out", f"{S}/new/t"],
        ["head_scal", "head_scale"],
        3,
    )
    add(
        "train-surgery-and-recipe",
        "train",
        ["train", T, "head_scale", "--recipe", "temperature", "--out", f"{S}/new/t"],
        ["head_scale", "--recipe"],
        2,
    )
    add(
        "train-out-exists",
        "train",
        ["train", T, "head_scale", "--out", f"{S}/existing-run"],
        ["existing-run", "--overwrite"],
        2,
    )
    add("train-out-empty", "train", ["train", T, "head_scale", "--out", ""], ["--out"], 2)
    add(
        "train-out-under-file",
        "train",
        ["train", T, "head_scale", "--out", f"{S}/a-file.txt/run", "--steps", "1"],
        ["a-file.txt"],
        2,
    )
    add(
        "train-data-typo",
        "train",
        ["train", T, "head_scale", "--data", "gutenberg_pl", "--out", f"{S}/new/t"],
        ["gutenberg_pl"],
        2,
    )
    add(
        "train-data-missing-file",
        "train",
        ["train", T, "head_scale", "--data", f"{S}/none.jsonl", "--out", f"{S}/new/t"],
        ["none.jsonl"],
        2,
    )
    add(
        "train-data-empty-file",
        "train",
        ["train", T, "head_scale", "--data", f"{S}/empty.txt", "--out", f"{S}/new/t", "--seq-len", "16"],
        ["empty.txt"],
        2,
    )
    add(
        "train-objective-empty",
        "train",
        ["train", T, "head_scale", "--objective", "", "--out", f"{S}/new/t"],
        ["--objective|objective"],
        2,
    )
    add(
        "train-objective-dangling-plus",
        "train",
        ["train", T, "head_scale", "--objective", "lm+", "--out", f"{S}/new/t"],
        ["lm\\+"],
        2,
    )
    add(
        "train-objective-negative",
        "train",
        ["train", T, "head_scale", "--objective=-1*kd", "--out", f"{S}/new/t"],
        ["-1"],
        2,
    )
    add(
        "train-objective-nan",
        "train",
        ["train", T, "head_scale", "--objective", "nan*lm", "--out", f"{S}/new/t"],
        ["nan"],
        2,
    )
    add(
        "train-objective-reversed",
        "train",
        ["train", T, "head_scale", "--objective", "kd*0.5", "--out", f"{S}/new/t"],
        ["kd\\*0.5"],
        2,
    )
    add(
        "train-lora-alpha-zero",
        "train",
        ["train", T, "--lora-r", "4", "--lora-alpha", "0", "--out", f"{S}/new/t"],
        ["--lora-alpha", "0"],
        2,
    )
    add(
        "train-lora-targets-typo",
        "train",
        [
            "train",
            T,
            "--lora-r",
            "4",
            "--lora-targets",
            "q_prj",
            "--out",
            f"{S}/new/t",
            "--steps",
            "1",
            "--seq-len",
            "16",
        ],
        ["q_prj"],
        4,
    )
    add(
        "train-lora-layers-40:2",
        "train",
        [
            "train",
            T,
            "--lora-r",
            "4",
            "--lora-layers",
            "40:2",
            "--out",
            f"{S}/new/t",
            "--steps",
            "1",
            "--seq-len",
            "16",
        ],
        ["40:2"],
        4,
    )
    add(
        "train-lora-targets-without-r",
        "train",
        ["train", T, "head_scale", "--lora-targets", "q_proj", "--out", f"{S}/new/t"],
        ["--lora-targets", "--lora-r"],
        2,
    )
    add(
        "train-train-base-typo",
        "train",
        ["train", T, "--train-base", "atention", "--out", f"{S}/new/t"],
        ["atention"],
        4,
    )
    add(
        "train-patience-zero",
        "train",
        ["train", T, "head_scale", "--patience", "0", "--out", f"{S}/new/t"],
        ["--patience", "0"],
        2,
    )
    add(
        "train-keep-typo",
        "train",
        ["train", T, "head_scale", "--keep", "worst", "--out", f"{S}/new/t"],
        ["worst"],
        2,
    )
    add(
        "train-mixed-precision",
        "train",
        ["train", T, "head_scale", "--mixed-precision", "fp8", "--out", f"{S}/new/t"],
        ["fp8"],
        2,
    )
    add(
        "train-seed-word",
        "train",
        ["train", T, "head_scale", "--seed", "abc", "--out", f"{S}/new/t"],
        ["abc"],
        2,
    )
    add(
        "train-seq-len-too-long",
        "train",
        ["train", T, "head_scale", "--seq-len", "100000", "--out", f"{S}/new/t", "--steps", "1"],
        ["100000"],
        2,
    )
    add(
        "train-arg-bad",
        "train",
        ["train", T, "head_scale", "--arg", "scale=-1", "--out", f"{S}/new/t"],
        ["scale=-1"],
        4,
    )
    add(
        "train-recipe-typo",
        "train",
        ["train", T, "--recipe", "temprature", "--out", f"{S}/new/t"],
        ["temprature"],
        5,
    )
    # -- linearize ----------------------------------------------------------------------------------------------------
    add("linearize-no-out", "linearize", ["linearize", T], ["--out"], 2)
    add(
        "linearize-window-negative",
        "linearize",
        ["linearize", T, "--out", f"{S}/new/l", "--window", "-1"],
        ["--window|window", "-1"],
        2,
    )
    add(
        "linearize-window-word",
        "linearize",
        ["linearize", T, "--out", f"{S}/new/l", "--window", "big"],
        ["big"],
        2,
    )
    add(
        "linearize-feature-dim-zero",
        "linearize",
        ["linearize", T, "--out", f"{S}/new/l", "--feature-dim", "0"],
        ["feature", "0"],
        2,
    )
    add(
        "linearize-stage1-zero",
        "linearize",
        ["linearize", T, "--out", f"{S}/new/l", "--stage1-steps", "0"],
        ["--stage1-steps"],
        2,
    )
    add(
        "linearize-out-exists",
        "linearize",
        ["linearize", T, "--out", f"{S}/existing-run"],
        ["existing-run", "--overwrite"],
        2,
    )
    add(
        "linearize-objective-typo",
        "linearize",
        ["linearize", T, "--out", f"{S}/new/l", "--stage2-objective", "kld"],
        ["kld"],
        2,
    )
    add(
        "linearize-layers-40:2",
        "linearize",
        [
            "linearize",
            T,
            "--out",
            f"{S}/new/l",
            "--layers",
            "40:2",
            "--stage1-steps",
            "1",
            "--stage2-steps",
            "0",
            "--seq-len",
            "16",
        ],
        ["40:2"],
        4,
    )
    add(
        "linearize-data-typo",
        "linearize",
        ["linearize", T, "--out", f"{S}/new/l", "--data", "gutenberg_pl"],
        ["gutenberg_pl"],
        2,
    )
    add(
        "linearize-linear-only-and-window",
        "linearize",
        ["linearize", T, "--out", f"{S}/new/l", "--linear-only", "--window", "32"],
        ["--linear-only", "--window"],
        2,
    )
    # -- the lm-eval bridge -----------------------------------------------------------------------------------------
    lm = [
        "lm-eval",
        "run",
        "--model",
        "attnsurgery",
        "--tasks",
        "bb_emoji_movie",
        "--limit",
        "1",
        "--model_args",
    ]
    add("lmeval-recipe-typo", "lm-eval", [*lm, f"pretrained={T},recipe=temprature"], ["temprature"], 5)
    add(
        "lmeval-surgery-args-bad",
        "lm-eval",
        [*lm, f"pretrained={T},surgery=temperature,surgery_args=tau:abc"],
        ["tau='abc'"],
        4,
    )
    add(
        "lmeval-surgery-args-no-colon",
        "lm-eval",
        [*lm, f"pretrained={T},surgery=temperature,surgery_args=tau"],
        ["tau"],
        2,
    )
    add(
        "lmeval-recipe-and-surgery",
        "lm-eval",
        [*lm, f"pretrained={T},recipe=temperature,surgery=act"],
        ["recipe", "surgery"],
        2,
    )
    add("lmeval-no-pretrained", "lm-eval", [*lm, "surgery=temperature"], ["pretrained"], 2)
    add(
        "lmeval-unknown-model-arg",
        "lm-eval",
        [*lm, f"pretrained={T},surgery=temperature,tau=0.8"],
        ["tau"],
        2,
    )
    add(
        "lmeval-model-typo",
        "lm-eval",
        [*lm, "pretrained=smollm2-13m,surgery=temperature"],
        ["smollm2-13m"],
        7,
    )
    # -- the packaged model (a load is unavoidable) -------------------------------------------------------------------
    add(
        "smollm2-prompt-empty",
        "apply/options",
        ["apply", "temperature", "smollm2-135m", "--arg", "tau=0.8", "--prompt", ""],
        ["prompt"],
        2,
        loads=True,
    )
    add(
        "smollm2-heads-99",
        "apply/targets",
        [
            "apply",
            "temperature",
            "smollm2-135m",
            "--arg",
            "tau=0.8",
            "--heads",
            "{10: [99]}",
            "--prompt",
            "x",
        ],
        ["99"],
        4,
        loads=True,
    )
    add(
        "smollm2-layers-40:2",
        "apply/targets",
        ["apply", "head_scale", "smollm2-135m", "--layers", "40:2", "--prompt", "x"],
        ["40:2"],
        4,
        loads=True,
    )
    return c


API_CASES = [
    # (id, category, code, expect)
    (
        "patch-not-a-model-string",
        "api/model",
        "patch('smollm2-135m', 'temperature')",
        ["str", "PreTrainedModel"],
    ),
    ("patch-tokenizer", "api/model", "patch(tok, 'temperature')", ["PreTrainedModel|model"]),
    ("patch-linear", "api/model", "patch(torch.nn.Linear(2, 2), 'temperature')", ["Linear"]),
    ("patch-surgery-none", "api/names", "patch(m, None)", ["None"]),
    ("patch-surgery-int", "api/names", "patch(m, 5)", ["5"]),
    ("patch-surgery-list", "api/names", "patch(m, ['temperature'])", ["list|\\['temperature'\\]"]),
    ("patch-surgery-typo", "api/names", "patch(m, 'head_scael')", ["head_scael", "head_scale"]),
    ("patch-recipe-path-missing-dir", "api/names", "patch(m, tmp / 'no-such-folder')", ["no-such-folder"]),
    ("patch-layers-40:2", "api/targets", "patch(m, 'temperature', tau=0.8, layers='40:2')", ["40:2"]),
    ("patch-layers-range-past", "api/targets", "patch(m, 'temperature', tau=0.8, layers=range(5))", ["3|4"]),
    (
        "patch-layers-slice-object",
        "api/targets",
        "patch(m, 'temperature', tau=0.8, layers=slice(0, 2))",
        ["slice"],
    ),
    ("patch-layers-mixed-list", "api/targets", "patch(m, 'temperature', tau=0.8, layers=[0, 'x'])", ["'x'"]),
    (
        "patch-layers-tensor",
        "api/targets",
        "patch(m, 'temperature', tau=0.8, layers=torch.tensor([0, 9]))",
        ["9"],
    ),
    ("patch-heads-99-layer", "api/targets", "patch(m, 'temperature', tau=0.8, heads={99: [0]})", ["99"]),
    ("patch-heads-key-word", "api/targets", "patch(m, 'temperature', tau=0.8, heads={'x': [0]})", ["'x'"]),
    (
        "patch-heads-value-dict",
        "api/targets",
        "patch(m, 'temperature', tau=0.8, heads={0: {1: 2}})",
        ["heads"],
    ),
    ("patch-heads-float", "api/targets", "patch(m, 'temperature', tau=0.8, heads=[0.5])", ["0.5"]),
    ("patch-heads-none-string", "api/targets", "patch(m, 'temperature', tau=0.8, heads='none')", ["none"]),
    ("patch-tau-per-layer-word-key", "api/args", "patch(m, 'temperature', tau={'x': 0.5})", ["'x'|x"]),
    ("patch-tau-per-layer-99", "api/args", "patch(m, 'temperature', tau={99: 0.5})", ["99"]),
    ("patch-tau-nested-wrong", "api/args", "patch(m, 'temperature', tau=[[0.5, 0.5]])", ["tau"]),
    ("patch-tau-int-tensor", "api/args", "patch(m, 'temperature', tau=torch.tensor([1, 2, 3, 4]))", ["tau"]),
    ("patch-tau-complex", "api/args", "patch(m, 'temperature', tau=1j)", ["tau"]),
    ("patch-act-beta-list", "api/args", "patch(m, 'act', beta=[0.4])", ["beta"]),
    (
        "patch-act-alpha-and-threshold",
        "api/args",
        "patch(m, 'act', alpha=1.0, threshold=0.1)",
        ["alpha", "threshold"],
    ),
    ("patch-moh-top-k-99", "api/args", "patch(m, 'moh', top_k=99)", ["top_k", "99"]),
    ("patch-moh-shared-negative", "api/args", "patch(m, 'moh', shared=-1)", ["shared"]),
    ("patch-hedgehog-window-zero", "api/args", "patch(m, 'hedgehog', window=0)", ["window"]),
    ("patch-hedgehog-feature-dim-zero", "api/args", "patch(m, 'hedgehog', feature_dim=0)", ["feature_dim"]),
    ("patch-lora-targets-empty-list", "api/args", "patch(m, 'lora', targets=[])", ["targets"]),
    ("patch-lora-targets-empty-string", "api/args", "patch(m, 'lora', targets='')", ["targets"]),
    ("patch-lora-dropout-one", "api/args", "patch(m, 'lora', dropout=1.5)", ["dropout"]),
    ("patch-finetune-targets-typo", "api/args", "patch(m, 'finetune', targets='q_prj')", ["q_prj"]),
    ("patch-gated-form-empty", "api/args", "patch(m, 'gated_attention', form='')", ["form"]),
    ("patch-reweight-p-zero", "api/args", "patch(m, 'reweight', p=0)", ["p=0"]),
    ("patch-clipped-zeta-inf", "api/args", "patch(m, 'clipped_softmax', zeta=float('inf'))", ["zeta"]),
    ("patch-vhr-alpha-negative", "api/args", "patch(m, 'vhr', alpha=-1)", ["alpha|vision"]),
    (
        "patch-recipe-override-unknown",
        "api/args",
        "patch(m, 'temperature/position', tua=0.8)",
        ["tua", "tau"],
    ),
    (
        "patch-mapping-recipe-typo",
        "api/recipes",
        "patch(m, {'surgeries': [{'surgery': 'temperature', 'arg': {'tau': 0.8}}]})",
        ["'arg'", "args"],
    ),
    (
        "patch-mapping-recipe-no-surgeries",
        "api/recipes",
        "patch(m, {'surgery': 'temperature'})",
        ["surgery", "surgeries"],
    ),
    (
        "parse-recipe-layers-mapping",
        "api/recipes",
        "patch(m, {'surgeries': [{'surgery': 'temperature', 'layers': {'a': 1}}]})",
        ["layers"],
    ),
    ("find-recipe-empty", "api/recipes", "find_recipe('')", ["''|empty"]),
    ("find-recipe-none", "api/recipes", "find_recipe(None)", ["None"]),
    ("load-recipe-binary", "api/recipes", "patch(m, str(tmp / 'recipes' / 'binary.yaml'))", ["binary.yaml"]),
    (
        "load-recipe-dupkey",
        "api/recipes",
        "patch(m, str(tmp / 'recipes' / 'dupkey.yaml'))",
        ["surgeries", "twice|duplicate|more than once"],
    ),
    (
        "save-surgery-not-a-handle",
        "api/files",
        "save_surgery('temperature', tmp / 'new' / 's')",
        ["handle|SurgeryHandle"],
    ),
    (
        "save-surgery-empty-path",
        "api/files",
        "h = patch(m, 'temperature', tau=0.8)\ntry:\n    save_surgery(h, '')\nfinally:\n    h.remove()",
        ["''|path|folder"],
    ),
    (
        "save-surgery-under-file",
        "api/files",
        "h = patch(m, 'temperature', tau=0.8)\ntry:\n    save_surgery(h, tmp / 'a-file.txt' / 'x')\nfinally:\n    h.remove()",
        ["a-file.txt"],
    ),
    ("load-surgery-missing", "api/files", "load_surgery(m, tmp / 'nothing-here')", ["nothing-here"]),
    ("load-surgery-a-file", "api/files", "load_surgery(m, tmp / 'a-file.txt')", ["a-file.txt"]),
    ("load-surgery-entry-no-name", "api/files", "load_surgery(m, tmp / 'load' / 'no-name')", ["surgery"]),
    (
        "load-surgery-entry-string",
        "api/files",
        "load_surgery(m, tmp / 'load' / 'entry-string')",
        ["entry|surgeries\\[0\\]|mapping"],
    ),
    ("load-surgery-heads-list", "api/files", "load_surgery(m, tmp / 'load' / 'heads-list')", ["heads"]),
    (
        "load-surgery-heads-word-key",
        "api/files",
        "load_surgery(m, tmp / 'load' / 'heads-word')",
        ["'x'|heads"],
    ),
    ("load-surgery-args-list", "api/files", "load_surgery(m, tmp / 'load' / 'args-list')", ["args"]),
    (
        "load-surgery-surgery-typo",
        "api/files",
        "load_surgery(m, tmp / 'load' / 'typo')",
        ["tempreature", "temperature"],
    ),
    ("load-surgery-bad-arg", "api/files", "load_surgery(m, tmp / 'load' / 'bad-arg')", ["tau"]),
    (
        "load-surgery-state-not-safetensors",
        "api/files",
        "load_surgery(m, tmp / 'load' / 'bad-state')",
        ["safetensors"],
    ),
    (
        "load-surgery-binary-config",
        "api/files",
        "load_surgery(m, tmp / 'load' / 'binary')",
        ["attnsurgery_config.json"],
    ),
    ("load-model-alias-typo", "api/load", "load_model('smollm2-13m')", ["smollm2-13m", "smollm2-135m"]),
    ("load-model-empty", "api/load", "load_model('')", ["''|empty"]),
    ("load-model-none", "api/load", "load_model(None)", ["None"]),
    ("load-model-dtype-typo", "api/load", "load_model(str(tmp / 'tiny'), dtype='float33')", ["float33"]),
    ("load-model-dtype-int", "api/load", "load_model(str(tmp / 'tiny'), dtype=32)", ["32"]),
    (
        "load-model-file",
        "api/load",
        "load_model(str(tmp / 'a-file.txt'))",
        ["a-file.txt", "not a folder|is a file"],
    ),
    (
        "attention-maps-layers-40:2",
        "api/maps",
        "attention_maps(m, torch.tensor([[1, 5, 6]]), layers='40:2')",
        ["40:2"],
    ),
    (
        "attention-maps-string-input",
        "api/maps",
        "attention_maps(m, 'The capital of France is')",
        ["str|input_ids|token"],
    ),
]


def cases() -> list[Case]:
    out = cli_cases()
    out += [Case(id, cat, code=code, expect=expect) for id, cat, code, expect in API_CASES]
    return out


# -- the sandbox ---------------------------------------------------------------------------------------------------------

SETUP = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch, yaml
from tiny import tiny_model, tiny_tokenizer
from attnsurgery import patch, save_surgery
tmp = Path({tmp!r})
model = tiny_model("llama")
model.save_pretrained(tmp / "tiny")
tiny_tokenizer().save_pretrained(tmp / "tiny")
h = patch(model, "temperature", tau=0.8)
save_surgery(h, tmp / "saved")
h.remove()
load = tmp / "load"
def saved(name, surgeries, state=None):
    (load / name).mkdir(parents=True)
    (load / name / "attnsurgery_config.json").write_text(json.dumps({{"attnsurgery_version": "0", "surgeries": surgeries}}))
    if state is not None:
        (load / name / "attnsurgery_state.safetensors").write_bytes(state)
saved("no-name", [{{"args": {{"tau": 0.8}}}}])
saved("entry-string", ["temperature"])
saved("heads-list", [{{"surgery": "temperature", "args": {{"tau": 0.8}}, "heads": [0]}}])
saved("heads-word", [{{"surgery": "temperature", "args": {{"tau": 0.8}}, "heads": {{"x": [0]}}}}])
saved("args-list", [{{"surgery": "temperature", "args": [0.8]}}])
saved("typo", [{{"surgery": "tempreature"}}])
saved("bad-arg", [{{"surgery": "temperature", "args": {{"tau": -1}}}}])
saved("bad-state", [{{"surgery": "temperature", "args": {{"tau": 0.8}}}}], b"not safetensors at all")
(load / "binary").mkdir()
(load / "binary" / "attnsurgery_config.json").write_bytes(b"\xff\xfe\x00\x81binary")
"""

RECIPES = {
    "empty": "",
    "list": "- temperature\n- act\n",
    "badyaml": "surgeries: [\n",
    "tabs": "surgeries:\n\t- surgery: temperature\n",
    "dupkey": "surgeries:\n  - surgery: temperature\n    args: {tau: 0.8}\nsurgeries:\n  - surgery: head_scale\n",
    "dup-arg": "surgeries:\n  - surgery: temperature\n    args: {tau: 0.8, tau: 0.5}\n",
    "nosurgeries": "name: x\n",
    "emptysurgeries": "surgeries: []\n",
    "args-list": "surgeries:\n  - surgery: temperature\n    args: [0.8]\n",
    "surgery-number": "surgeries:\n  - surgery: 5\n",
    "surgery-null": "surgeries:\n  - surgery: null\n",
    "unknown-key": "modle: x\nsurgeries: [temperature]\n",
    "entry-unknown-key": "surgeries:\n  - surgery: temperature\n    arg: {tau: 0.8}\n",
    "tau-zero": "surgeries:\n  - surgery: temperature\n    args: {tau: 0}\n",
    "layers-40-2": "surgeries:\n  - surgery: temperature\n    args: {tau: 0.8}\n    layers: '40:2'\n",
    "heads-99": "surgeries:\n  - surgery: temperature\n    args: {tau: 0.8}\n    heads: {99: [0]}\n",
    "state-dir": "surgeries:\n  - surgery: head_scale\n    args: {trainable: true}\n    state: statedir\n",
    "state-missing": "surgeries:\n  - surgery: head_scale\n    args: {trainable: true}\n    state: gone.safetensors\n",
    "state-not-safetensors": "surgeries:\n  - surgery: head_scale\n    args: {trainable: true}\n    state: not-st.safetensors\n",
    "eval-list": "surgeries: [temperature]\neval: [bb_emoji_movie]\n",
    "model-list": "model: [a, b]\nsurgeries: [temperature]\n",
    "name-mapping": "name: {a: 1}\nsurgeries: [temperature]\n",
    "two": "surgeries:\n  - surgery: temperature\n  - surgery: head_scale\n",
}


def make_sandbox(root: Path) -> None:
    (root / "emptydir").mkdir()
    (root / "dir.yaml").mkdir()
    (root / "a-file.txt").write_text("not a folder\n")
    (root / "existing.png").write_bytes(b"\x89PNG an earlier plot")
    (root / "existing.yaml").write_text("# an earlier recipe\n")
    (root / "existing-run").mkdir()
    (root / "existing-run" / "training.json").write_text("{}\n")
    (root / "bad.jsonl").write_text('{"query": "q", "choices": ["a"]\nnot json\n')
    (root / "norecords.jsonl").write_text('{"foo": 1}\n{"bar": 2}\n')
    (root / "empty.txt").write_text("")
    (root / "table-typo.yaml").write_text(
        "name: t\nmodles: [smollm2-135m]\narms: {}\ntasks: [bb_emoji_movie]\n"
    )
    recipes = root / "recipes"
    recipes.mkdir()
    for name, text in RECIPES.items():
        (recipes / f"{name}.yaml").write_text(text)
    (recipes / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81\x92binary\x00")
    (recipes / "statedir").mkdir()
    (recipes / "not-st.safetensors").write_bytes(b"garbage")
    (root / "cwd").mkdir()
    code = SETUP.format(tests=str(ROOT / "tests"), tmp=str(root))
    subprocess.run([PY, "-c", code], check=True, cwd=ROOT)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if rel.parts[0] in ("cache",) or p.is_dir():
            continue
        st = p.stat()
        out[str(rel)] = (st.st_mtime_ns, st.st_size)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


# -- running ---------------------------------------------------------------------------------------------------------


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ATTNSURGERY_CACHE=str(root / "cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="400",
        PYTHONWARNINGS="ignore",
    )
    env.pop("ATTNSURGERY_DEBUG", None)
    env.pop("ATTNSURGERY_VERBOSE", None)
    return env


def _fill(text: str, root: Path) -> str:
    return text.replace("{tiny}", str(root / "tiny")).replace("{tmp}", str(root)).replace("{repo}", str(ROOT))


def _named(expect: list[str], text: str) -> bool:
    flat = " ".join(text.split())
    return all(re.search(p, flat, re.IGNORECASE) for p in expect)


# The fork server: one process per sandbox that imports the CLI (torch, transformers, lm-eval) once and forks a
# child per case; the child runs exactly what the `attnsurgery` script runs, `sys.exit(main())`, with its stdout and
# stderr sent to files, so an uncaught exception prints its traceback there as it would on a terminal. It saves the
# ~4 s import per case (x 200 cases) on a 2-core machine; --subprocess runs every case as its own process instead.
FORKSERVER = r"""
import json, os, signal, sys, time
import attnsurgery.cli, attnsurgery.api, attnsurgery.commands._common, transformers, lm_eval  # noqa
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.chdir(job["cwd"])
        for name in ("out", "err"):
            fd = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1 if name == "out" else 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.argv = ["attnsurgery", *job["argv"]]
        code = 1
        try:
            from attnsurgery.cli import main
            code = main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)
    deadline = time.time() + job["timeout"]
    rc = None
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.05)
    if rc is None:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print(json.dumps({"rc": rc}), flush=True)
"""


class ForkServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [PY, "-c", FORKSERVER],
            cwd=root / "cwd",
            env=_env(root),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def run(self, argv: list[str], timeout: float) -> tuple[int | None, str, str]:
        out, err = self.root / "cwd.stdout", self.root / "cwd.stderr"
        job = {
            "argv": argv,
            "cwd": str(self.root / "cwd"),
            "out": str(out),
            "err": str(err),
            "timeout": timeout,
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        text = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
        for p in (out, err):
            p.unlink(missing_ok=True)
        return rc, text[0], text[1] + ("" if rc is not None else f"\n[timed out after {timeout}s]")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_cli(case: Case, root: Path, timeout: float, server: ForkServer | None = None) -> dict:
    argv = [_fill(a, root) for a in case.argv or []]
    before = snapshot(root)
    start = time.perf_counter()
    if server is not None:
        rc, out, err = server.run(argv, timeout)
    else:
        try:
            proc = subprocess.run(
                [CLI, *argv],
                cwd=root / "cwd",
                env=_env(root),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out, err = None, exc.stdout or "", (exc.stderr or "") + f"\n[timed out after {timeout}s]"
            out = out.decode() if isinstance(out, bytes) else out
            err = err.decode() if isinstance(err, bytes) else err
    seconds = time.perf_counter() - start
    wrote = changed(before, snapshot(root))
    text = err + "\n" + out
    traceback = "Traceback" in text
    if rc == 0:
        verdict = "silent"
    elif traceback:
        verdict = "traceback"
    elif rc == 1 and "unexpected error" in text or rc is None:
        verdict = "bug"
    elif not _named(case.expect, text):
        verdict = "unclear"
    elif wrote:
        verdict = "wrote"
    elif case.exit is not None and rc != case.exit:
        verdict = "code"
    else:
        verdict = "ok"
    message = _message(err if rc != 0 else out)
    return {
        "id": case.id,
        "category": case.category,
        "input": "attnsurgery " + " ".join(_quote(a) for a in case.argv or []),
        "exit": rc,
        "expected_exit": case.exit,
        "traceback": traceback,
        "names_value": _named(case.expect, text),
        "silent": rc == 0,
        "wrote": wrote,
        "verdict": verdict,
        "message": message,
        "seconds": round(seconds, 1),
        "loads": case.loads,
    }


def _quote(a: str) -> str:
    return a if a and re.fullmatch(r"[\w./:{}=,+-]+", a) else repr(a)


def _message(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith(("error:", "usage:")) or "error" in ln.lower():
            return " ".join(" ".join(lines[i:]).split())[:400]
    return " ".join(" ".join(lines[-3:]).split())[:400]


WORKER = r"""
import json, sys, traceback
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from tiny import tiny_model, tiny_tokenizer
from attnsurgery import patch, save_surgery, load_surgery, load_model, attention_maps, find_recipe
from attnsurgery.engine import Engine
from attnsurgery.errors import AttnSurgeryError
tmp = Path({tmp!r})
m = tiny_model("llama")
tok = tiny_tokenizer()
results = []
for id, code in json.loads(sys.stdin.read()):
    ns = dict(globals())
    try:
        exec(code, ns)
        exc = None
    except BaseException as e:
        exc = e
    engine = Engine.of(m, create=False)
    results.append({{
        "id": id,
        "raised": None if exc is None else type(exc).__name__,
        "attnsurgery_error": isinstance(exc, AttnSurgeryError),
        "message": "" if exc is None else str(exc),
        "traceback": "" if exc is None or isinstance(exc, AttnSurgeryError) else "".join(traceback.format_exception(exc))[-1500:],
        "model_clean": engine is None or not engine.surgeries,
    }})
    if engine is not None:
        for s in list(engine.surgeries):
            engine.remove(s)
print("RESULTS" + json.dumps(results))
"""


def run_api(api: list[Case], root: Path, timeout: float) -> list[dict]:
    if not api:
        return []
    before = snapshot(root)
    code = WORKER.format(tests=str(ROOT / "tests"), tmp=str(root))
    start = time.perf_counter()
    proc = subprocess.run(
        [PY, "-c", code],
        input=json.dumps([[c.id, c.code] for c in api]),
        cwd=root / "cwd",
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=timeout * 4,
    )
    seconds = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")), None)
    if line is None:
        raise RuntimeError(f"the API worker failed:\n{proc.stderr[-3000:]}")
    got = {r["id"]: r for r in json.loads(line[len("RESULTS") :])}
    wrote = changed(before, snapshot(root))
    rows = []
    for case in api:
        r = got[case.id]
        named = _named(case.expect, r["message"])
        if r["raised"] is None:
            verdict = "silent"
        elif not r["attnsurgery_error"]:
            verdict = "bug"
        elif not named:
            verdict = "unclear"
        elif not r["model_clean"]:
            verdict = "wrote"
        else:
            verdict = "ok"
        rows.append(
            {
                "id": case.id,
                "category": case.category,
                "input": case.code.replace("\n", "; "),
                "exit": None,
                "expected_exit": None,
                "raised": r["raised"],
                "traceback": bool(r["traceback"]),
                "names_value": named,
                "silent": r["raised"] is None,
                "wrote": [] if r["model_clean"] else ["(model left patched)"],
                "verdict": verdict,
                "message": " ".join(r["message"].split())[:400]
                if r["raised"] is None or r["attnsurgery_error"]
                else f"{r['raised']}: {' '.join(r['message'].split())[:300]}",
                "seconds": round(seconds / len(api), 2),
                "loads": False,
            }
        )
    if wrote:
        rows.append(
            {
                "id": "api-files",
                "category": "api/files",
                "input": "(all API cases)",
                "verdict": "wrote",
                "wrote": wrote,
                "message": "",
                "exit": None,
                "traceback": False,
                "names_value": True,
                "silent": False,
                "seconds": 0,
                "loads": False,
            }
        )
    return rows


def render(rows: list[dict], seconds: float) -> str:
    from collections import Counter

    verdicts = Counter(r["verdict"] for r in rows)
    by_cat: dict[str, Counter] = {}
    for r in rows:
        by_cat.setdefault(r["category"], Counter())[r["verdict"]] += 1
    kinds = ["ok", "traceback", "bug", "silent", "unclear", "wrote", "code"]
    lines = [
        "# Bad inputs: what a user meets",
        "",
        f"`.venv/bin/python evals/bad_inputs.py` — {len(rows)} cases "
        f"({sum(1 for r in rows if r['input'].startswith('attnsurgery'))} CLI, "
        f"{sum(1 for r in rows if not r['input'].startswith('attnsurgery'))} API), "
        f"{sum(1 for r in rows if r.get('loads'))} of them load smollm2-135m; {seconds / 60:.1f} min.",
        "",
        "Verdicts: " + ", ".join(f"**{k}** {verdicts.get(k, 0)}" for k in kinds) + ".",
        "",
        "ok: refused with a message naming the bad value, no traceback, nothing written; traceback: 'Traceback' "
        "reached the user; bug: the CLI's 'unexpected error' catch-all (exit 1) or a non-AttnSurgeryError from the "
        "API; silent: accepted (exit 0 / no exception); unclear: the message does not name the bad value; wrote: a "
        "file written or replaced (or the model left patched); code: another exit code than the documented one.",
        "",
        "| category | cases | " + " | ".join(kinds) + " |",
        "|---|---:|" + "---:|" * len(kinds),
    ]
    for cat in sorted(by_cat):
        cnt = by_cat[cat]
        lines.append(
            f"| {cat} | {sum(cnt.values())} | " + " | ".join(str(cnt.get(k, 0)) for k in kinds) + " |"
        )
    lines.append(f"| **all** | {len(rows)} | " + " | ".join(str(verdicts.get(k, 0)) for k in kinds) + " |")
    bad = [r for r in rows if r["verdict"] != "ok"]
    lines += ["", f"## Not ok ({len(bad)})", ""]
    if bad:
        lines += ["| case | input | exit | verdict | message |", "|---|---|---:|---|---|"]
        for r in bad:
            lines.append(_row(r))
    else:
        lines.append("none")
    lines += [
        "",
        "## Every case",
        "",
        "| case | input | exit | verdict | message |",
        "|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(_row(r))
    return "\n".join(lines) + "\n"


def _row(r: dict) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    exit_ = "" if r.get("exit") is None else str(r["exit"])
    if r.get("expected_exit") is not None and r.get("exit") != r["expected_exit"]:
        exit_ += f" (doc {r['expected_exit']})"
    extra = f" wrote {', '.join(r['wrote'])}" if r.get("wrote") else ""
    return f"| {r['id']} | `{cell(r['input'])[:160]}` | {exit_} | {r['verdict']}{extra} | {cell(r['message'])[:260]} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="evals/results/bad_inputs/results.md", help="markdown summary")
    parser.add_argument("--json", default=None, help="also write every case as JSON (default: beside --out)")
    parser.add_argument(
        "-k", action="append", default=None, help="only cases whose id contains this (repeatable)"
    )
    parser.add_argument("--no-load", action="store_true", help="skip the cases that load smollm2-135m")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per CLI case")
    parser.add_argument("--keep", action="store_true", help="keep the sandbox folder")
    parser.add_argument(
        "--subprocess",
        action="store_true",
        help="run each CLI case as its own `attnsurgery` process (slower)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="CLI cases run at once (each in its own sandbox copy)"
    )
    args = parser.parse_args()
    selected = [
        c
        for c in cases()
        if (not args.k or any(k in c.id for k in args.k)) and not (args.no_load and c.loads)
    ]
    root = Path(tempfile.mkdtemp(prefix="attnsurgery-bad-"))
    start = time.perf_counter()
    try:
        make_sandbox(root)
        cli = [c for c in selected if c.argv is not None]
        done = 0

        sandboxes: queue.Queue[tuple[Path, ForkServer | None]] = queue.Queue()
        boxes = [root]
        for i in range(
            1, max(1, args.jobs)
        ):  # one sandbox per job: another case's files never look like its own
            shutil.copytree(root, f"{root}-{i}", symlinks=True)
            boxes.append(Path(f"{root}-{i}"))
        servers = [] if args.subprocess or not cli else [ForkServer(box) for box in boxes]
        for i, box in enumerate(boxes):
            sandboxes.put((box, servers[i] if servers else None))

        def one(case: Case) -> dict:
            nonlocal done
            box, server = sandboxes.get()
            try:
                row = run_cli(case, box, args.timeout, server)
            finally:
                sandboxes.put((box, server))
            done += 1
            print(
                f"[{done}/{len(cli)}] {row['verdict']:9s} {case.id} ({row['exit']}, {row['seconds']}s) "
                f"{row['message'][:120]}",
                flush=True,
            )
            return row

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(one, cli))
        for server in servers:
            server.close()
        api_rows = run_api([c for c in selected if c.code is not None], root, args.timeout)
        for row in api_rows:
            print(f"[api] {row['verdict']:9s} {row['id']} {row['message'][:120]}", flush=True)
        rows += api_rows
    finally:
        if args.keep:
            print(f"sandbox kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            for i in range(1, max(1, args.jobs)):
                shutil.rmtree(f"{root}-{i}", ignore_errors=True)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, seconds))
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    bad = sum(r["verdict"] != "ok" for r in rows)
    print(f"{len(rows)} cases, {bad} not ok; wrote {out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
