"""Figures the README quotes come from committed result files: the mini-table deltas must match table.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_rows():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("`attnsurgery reproduce evals/mini.yaml`") :]
    rows = re.findall(
        r"^\| (\S+) \| (\S+) \| (\S+) \| (\S+) \| ([+-]\d+\.\d+) \| (<?[\d.]+) \|$", block, re.M
    )
    assert rows, "the README's mini-table block is missing"
    return rows


def test_readme_mini_deltas_match_table_json():
    reports = {
        r["model"]: r for r in json.loads((ROOT / "evals/results/mini/table.json").read_text())["reports"]
    }
    for model, arm, task, metric, delta, p in _readme_rows():
        row = next(r for r in reports[model]["table"] if r["task"] == task and r["metric"] == metric)
        got = row["arms"][arm]
        assert f"{got['delta']:+.3f}" == delta, (model, arm, task, metric)
        want_p = "<0.001" if got["p"] < 0.001 else f"{got['p']:.2g}"
        assert want_p == p, (model, arm, task, metric, got["p"])


def test_readme_training_table_figures_match_table_json():
    """The README's MoH / linearization rows: perplexity and relative change straight from each table.json."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (moh|linearize) \| (\S+) \| ([\d.]+) \| ([+-]\d+)% \| ([\d,]+) \|$", text, re.M)
    assert len(rows) >= 4, "the README's training-table rows are missing"
    for table, arm, ppl, rel, tokens in rows:
        data = json.loads((ROOT / f"evals/results/{table}/table.json").read_text())["rows"]
        base = next(r for r in data if r["arm"] == "baseline")
        row = next(r for r in data if r["arm"] == arm)
        assert f"{row['ppl_fp']:.3f}" == ppl, (table, arm)
        assert f"{(row['ppl_fp'] - base['ppl_fp']) / base['ppl_fp'] * 100:+.0f}" == rel, (table, arm)
        assert f"{row['train_tokens']:,}" == tokens, (table, arm)


def test_readme_linear_benchmark_figures_match_json():
    """The README's linear-attention speed paragraph quotes docs/benchmarks-linear/bench_linear.json."""
    text = (ROOT / "README.md").read_text()
    para = text[text.index("Linear attention pays off with length") :]
    para = para[: para.index("command that rewrites them")]
    result = json.loads((ROOT / "docs/benchmarks-linear/bench_linear.json").read_text())
    prefill = {(r["arm"], r["length"]): r["seconds"] for r in result["prefill"]}
    flat = " ".join(para.split())
    for arm in ("linear", "hybrid"):
        ratios = [prefill[(arm, n)] / prefill[("sdpa", n)] for n in (8192, 16384, 32768)]
        assert " / ".join(f"{r:.2f}x" for r in ratios) in flat, arm
    cache = {(r["arm"], r["context"]): r["cache_mib"] for r in result["decode"]}
    assert f"{cache[('linear', 32768)]:.1f} MiB" in para and f"{cache[('hybrid', 32768)]:.1f} MiB" in para
    assert f"{cache[('sdpa', 32768)]:,.0f} MiB" in para
    decode = {(r["arm"], r["context"]): r["seconds_per_token"] * 1e3 for r in result["decode"]}
    assert f"SDPA's {decode[('sdpa', 1024)]:.0f} → {decode[('sdpa', 32768)]:.0f} ms" in para


def test_readme_outlier_retrofit_rows_match_table_json():
    """The README's retrofit rows (FP / OOD perplexity, W8A8 gap, first-token share, each with its change against
    the baseline) straight from evals/results/outliers/table.json."""
    text = (ROOT / "README.md").read_text()
    cell = r"([\d.]+) \(([+-]\d+)%\)"
    rows = re.findall(
        rf"^\| outliers \| (\S+) \| {cell} \| {cell} \| {cell} \| {cell} \| ([\d,]+) \|$", text, re.M
    )
    assert len(rows) >= 3, "the README's outlier retrofit rows are missing"
    data = json.loads((ROOT / "evals/results/outliers/table.json").read_text())["rows"]
    for label, *cells, tokens in rows:  # "arm" (SmolLM2-135M) or "model/arm"
        model, arm = label.split("/") if "/" in label else ("smollm2-135m", label)
        base = next(r for r in data if r["arm"] == "baseline" and r["model"] == model)
        row = next(r for r in data if r["arm"] == arm and r["model"] == model)
        for (value, rel), (key, fmt) in zip(
            zip(cells[::2], cells[1::2]),
            [("ppl_fp", "{:.2f}"), ("ppl_ood", "{:.2f}"), ("w8a8_gap", "{:.1f}"), ("sink_share", "{:.3f}")],
        ):
            assert fmt.format(row[key]) == value, (arm, key)
            assert f"{(row[key] - base[key]) / base[key] * 100:+.0f}" == rel, (arm, key)
        assert f"{row['train_tokens']:,}" == tokens, arm


def test_gpu_page_figures_match_committed_results():
    """docs/gpu.md's benchmark ratios and tile timings are those of docs/benchmarks-gpu.json and gpu-tiles.json."""
    text = (ROOT / "docs/gpu.md").read_text()
    bench = json.loads((ROOT / "docs/benchmarks-gpu.json").read_text())["results"]
    ratio = {(r["arm"], r["tokens"]): r for r in bench}
    names = {  # the page's row labels -> the benchmark's arm names
        "identity (": "identity (all surgeries, every layer)",
        "temperature τ=0.9": "temperature tau=0.9 (query stage)",
        "head_scale 0.5": "head_scale 0.5 (head-output stage)",
        "gated_attention headwise": "gated_attention headwise (head-output stage)",
        "gated_attention elementwise": "gated_attention elementwise (head-output stage)",
        "clipped_softmax (tiled": "clipped_softmax (tiled)",
        "ACT β=0.4": "act beta=0.4 thr=0.1 (fused + correction)",
        "ACT without": "act beta=0.4 thr=0.1 (tiled, no fused kernel)",
    }
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, re.M)
    checked = 0
    for label, t2k, t8k, m8k in rows:
        arm = next((v for k, v in names.items() if label.startswith(k)), None)
        if arm is None:
            continue
        assert f"{ratio[(arm, 2048)]['time_ratio']:.2f}" == t2k, label
        assert f"{ratio[(arm, 8192)]['time_ratio']:.2f}" == t8k, label
        assert f"{ratio[(arm, 8192)]['memory_ratio']:.2f}" == m8k, label
        checked += 1
    assert checked == len(names), "docs/gpu.md's benchmark table lost rows"
    tiles = {
        (r["tokens"], r["block_rows"]): r
        for r in json.loads((ROOT / "evals/results/gpu/gpu-tiles.json").read_text())["rows"]
    }
    tile_rows = re.findall(
        r"^\| (?:\*\*)?([\d,]+)(?: \(the default\)\*\*)? \| ([\d.]+) ms \| ([\d,]+) \| (?:\*\*)?([\d.]+) ms(?:\*\*)? \| ([\d,]+) \|$",
        text,
        re.M,
    )
    assert len(tile_rows) == 6, tile_rows
    for rows, ms2k, mib2k, ms8k, mib8k in tile_rows:
        short, long = tiles[(2048, int(rows.replace(",", "")))], tiles[(8192, int(rows.replace(",", "")))]
        assert f"{short['seconds'] * 1e3:.2f}" == ms2k and f"{long['seconds'] * 1e3:.1f}" == ms8k, rows
        assert f"{short['peak_mib']:,.0f}" == mib2k and f"{long['peak_mib']:,.0f}" == mib8k, rows


def test_readme_how_long_table_matches_the_committed_benchmark():
    """The README's "how long does it take" seconds are docs/benchmarks-commands.json's (python
    evals/bench_commands.py), every command listed there and every one of them exited 0."""
    bench = json.loads((ROOT / "docs/benchmarks-commands.json").read_text())
    text = (ROOT / "README.md").read_text()
    block = text[text.index("### How long does it take") :]
    block = block[: block.index("\n## ")]
    shown = [int(x) for x in re.findall(r"^\| `[^|]+\| (\d+) s \|$", block, re.M)]
    assert shown == [round(r["seconds"]) for r in bench["rows"]]
    assert all(r["rc"] == 0 for r in bench["rows"])


def test_row_block_speed_rows_match_committed_benchmarks():
    """The README's CPU row-block rows: times from docs/benchmarks-cpu-kernels-time.json (best of 4), memory at 8k
    from docs/benchmarks-cpu-kernels.json, and the quoted 3-run times from the latter."""
    text = (ROOT / "README.md").read_text()
    timed = {
        (r["arm"], r["tokens"]): r
        for r in json.loads((ROOT / "docs/benchmarks-cpu-kernels-time.json").read_text())["results"]
    }
    run3 = {
        (r["arm"], r["tokens"]): r
        for r in json.loads((ROOT / "docs/benchmarks-cpu-kernels.json").read_text())["results"]
    }
    names = {  # the README's row labels -> the benchmark's arm names
        "`clipped_softmax`, CPU row-block kernel": "clipped_softmax (own kernel)",
        "`clipped_softmax`, the torch tiled pass": "clipped_softmax (no row-block kernel: torch pass)",
        "`act` beta 0.4, threshold 0.1, all heads: CPU row-block": "act beta=0.4 thr=0.1 (fused + correction)",
        "`act`, the torch tiled pass": "act beta=0.4 thr=0.1 (no row-block kernel: torch pass)",
        "`moh` 7 of 9 heads": "moh 75% heads (skipped work)",
    }
    rows = re.findall(r"^\| (.+?) \| – \| ([\d.]+)x \| ([\d.]+)x \| ([\d.]+)x \|$", text, re.M)
    checked = 0
    for label, t2k, t8k, m8k in rows:
        arm = next((v for k, v in names.items() if label.startswith(k)), None)
        if arm is None:
            continue
        assert f"{timed[(arm, 2048)]['time_ratio']:.2f}" == t2k, label
        assert f"{timed[(arm, 8192)]['time_ratio']:.2f}" == t8k, label
        assert f"{run3[(arm, 8192)]['memory_ratio']:.2f}" == m8k, label
        checked += 1
    assert checked == len(names), "the README's row-block rows are missing"
    flat = " ".join(text.split())
    for arm, quoted in (
        ("act beta=0.4 thr=0.1 (fused + correction)", "ACT measured {} / {}"),
        ("clipped_softmax (own kernel)", "clipped softmax {} / {}"),
    ):
        ratios = [f"{run3[(arm, n)]['time_ratio']:.2f}x" for n in (2048, 8192)]
        assert quoted.format(*ratios) in flat, arm
    for arm, quoted in (  # the attention call alone, from the timed run
        ("act beta=0.4 thr=0.1 (fused + correction)", "ACT {} / {}"),
        ("clipped_softmax (own kernel)", "clipped softmax {} / {}"),
        ("moh 75% heads (skipped work)", "MoH {} / {} of stock SDPA's"),
    ):
        ratios = [f"{timed[(arm, n)]['attention_ratio']:.2f}x" for n in (2048, 8192)]
        assert quoted.format(*ratios) in flat, arm


def test_row_block_thread_scaling_matches_its_benchmark():
    """The README's 'a second thread speeds the kernel up A-Bx where it gave C-Dx, and flash E-Fx' from
    docs/benchmarks-rowblock.json (one layer's q/k/v at 1 and 2 threads, both builds)."""
    text = " ".join((ROOT / "README.md").read_text().split())
    rows = json.loads((ROOT / "docs/benchmarks-rowblock.json").read_text())["results"]

    def scaling(build, passes):
        out = []
        for r in rows:
            one = next(
                x for x in rows if (x["tokens"], x["build"], x["threads"]) == (r["tokens"], r["build"], 1)
            )
            if r["build"] == build and r["threads"] == 2:
                out += [one["seconds"][p] / r["seconds"][p] for p in passes]
        return f"{min(out):.2f}-{max(out):.2f}x"

    kernel = [p for p in rows[0]["seconds"] if p != "stock sdpa (flash)"]
    openmp, serial = "openmp loop", "serial loop (no -fopenmp)"
    assert all(r["loop_threads"] == r["threads"] for r in rows if r["build"] == openmp)
    assert all(r["loop_threads"] == 1 for r in rows if r["build"] == serial)
    quoted = (
        f"a second thread speeds the kernel up {scaling(openmp, kernel)} where it gave {scaling(serial, kernel)}, "
        f"and flash {scaling(openmp, ['stock sdpa (flash)'])}"
    )
    assert quoted in text


def test_readme_cpu_training_speed_figures_match_the_bf16_benchmark():
    """The README's 'Speed on a CPU' bullet: heap and bf16 speed-ups, memory and gradient cosines from
    docs/benchmarks-bf16.json."""
    text = (ROOT / "README.md").read_text()
    bullet = text[text.index("- **Speed on a CPU:**") :].split("\n- ")[0]
    cases = {c["case"]: c for c in json.loads((ROOT / "docs/benchmarks-bf16.json").read_text())["cases"]}
    gemma, smol = cases["gates-gemma-soft"], [c for name, c in cases.items() if name != "gates-gemma-soft"]

    def arm(case, bf16, kept):
        return next(a for a in case["arms"] if a["bf16"] == bf16 and a["heap_kept"] == kept)

    def span(values, fmt):
        return f"{fmt.format(min(values))}-{fmt.format(max(values))}"

    heap = [arm(c, False, True)["speedup"] for c in smol]
    both = [arm(c, True, True)["speedup"] for c in smol]
    memory = max(
        arm(c, False, True)["peak_rss_mib"] / arm(c, False, False)["peak_rss_mib"] for c in cases.values()
    )
    cosines = [c["grad_cos_bf16_fp32_min"] for c in cases.values()]
    apart = [c["grad_cos_between_batches_fp32_max"] for c in cases.values()]
    for figure in (
        f"retrofit step {arm(gemma, False, True)['speedup']:.2f}x faster",
        f"SmolLM2's {span(heap, '{:.2f}')}x",
        f"up to {memory:.2f}x the peak memory",
        f"({arm(gemma, True, True)['speedup']:.2f}x in all on Gemma-3",
        f"{span(both, '{:.2f}')}x on SmolLM2",
        f"cosine {min(cosines):.2f}-{max(cosines):.3f}",
        f"sit at {span(apart, '{:.2f}')}",
    ):
        assert figure in " ".join(bullet.split()), figure


def test_readme_gate_inference_figures_match_their_benchmark():
    """The README's training bullet quotes the gates' prefill ratios at 512 / 2,048 / 8,192 tokens from
    docs/benchmarks-gates.json."""
    text = " ".join((ROOT / "README.md").read_text().split())
    rows = {
        (r["arm"], r["tokens"]): r
        for r in json.loads((ROOT / "docs/benchmarks-gates.json").read_text())["results"]
    }
    for form, phrase in (("headwise", "headwise gate costs {}"), ("elementwise", "elementwise gate {}")):
        ratios = " / ".join(
            f"{rows[(f'gated_attention {form} (head-output stage)', n)]['time_ratio']:.2f}x"
            for n in (512, 2048, 8192)
        )
        assert phrase.format(ratios) in text, form
