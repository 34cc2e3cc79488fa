from __future__ import annotations

import subprocess
import sys

import pytest

from attnsurgery.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("temperature", "head_scale", "clipped_softmax", "temperature/default", "smollm2-135m"):
        assert name in out


def test_list_verbose_shows_arguments(capsys):
    assert main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    assert "tau = 1.0" in out and "gamma = 0.0" in out


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["apply", "temprature", "smollm2-135m"], 3, "Did you mean 'temperature'"),
        (["apply", "temperature", "smollm2-135m", "--arg", "tau=-2"], 4, "out of range"),
        (["apply", "temperature", "smollm2-135m", "--arg", "tau"], 2, "name=value"),
        (["apply", "--recipe", "nope/nothing", "smollm2-135m"], 5, "unknown recipe"),
        (["apply", "temperature"], 2, "needs SURGERY MODEL"),
        (["apply", "temperature", "/no/such/model/dir"], 7, "does not exist"),
        (["calibrate", "act", "smollm2-135m"], 2, "calibration data missing"),
        (["calibrate", "act", "smollm2-135m", "--data", "gutenberg_ppl"], 2, "needs multiple_choice data"),
        (
            ["calibrate", "temperature", "smollm2-135m", "--data", "bb_general_knowledge"],
            2,
            "needs perplexity",
        ),
        (["calibrate", "act", "smollm2-135m", "--data", "bb_general_knowlege"], 2, "Did you mean"),
        (["calibrate", "act", "smollm2-135m", "--data", "/no/such.jsonl"], 2, "does not exist"),
        (
            ["eval", "smollm2-135m", "--tasks", "bb_general_knowlege"],
            2,
            "Did you mean 'bb_general_knowledge'",
        ),
        (["eval", "smollm2-135m", "--tasks", "offline", "--recipe", "act/nope"], 5, "unknown recipe"),
        (["reproduce", "/no/such/table.yaml"], 2, "does not exist"),
    ],
)
def test_bad_input_exit_codes(argv, code, message, capsys):
    assert main(argv) == code
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert message in err


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys; from attnsurgery.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_library_noise_goes_to_a_log_file(tmp_path):
    """Weight-loading bars and bitsandbytes' / kernels' offline notices stay off the console (a LoRA run used to print
    three of them), in $ATTNSURGERY_CACHE/logs/libraries.log; our own lines stay."""
    import os
    import subprocess
    import sys

    from tiny import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "m"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    env = {**os.environ, "ATTNSURGERY_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("ATTNSURGERY_VERBOSE", None)
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    cmd = [
        sys.executable,
        "-m",
        "attnsurgery",
        "apply",
        "lora",
        str(model_dir),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "loaded" in console and "patched" in console  # ours
    for noise in ("Loading weights", "gemm_4bit_forward", "Skipping publisher trust check"):
        assert noise not in console, noise
    log = tmp_path / "cache" / "logs" / "libraries.log"
    assert not log.exists() or "Traceback" not in log.read_text()


@pytest.mark.parametrize("module", ["attnsurgery.eval.budget", "attnsurgery.eval.longctx", "attnsurgery.train.corpora"])
def test_python_m_runners_route_library_noise(module, tmp_path):
    """The `python -m` runners route library noise like the CLI does: the budget runner's LoRA arms printed
    bitsandbytes' offline kernel notice on every run. The same warnings, sent through the libraries' own loggers,
    reach the console without the runner's main (the control) and only the log file with it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ATTNSURGERY_CACHE": str(tmp_path / "cache")}
    env.pop("ATTNSURGERY_VERBOSE", None)
    emit = (
        "import logging\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('NOISE gemm_4bit_forward')\n"
        "logging.getLogger('kernels._internals.hf_hub').warning('NOISE publisher trust')\n"
    )
    run_main = f"import importlib\ntry:\n    importlib.import_module('{module}').main(['--help'])\nexcept SystemExit:\n    pass\n"
    control = subprocess.run([sys.executable, "-c", emit], env=env, capture_output=True, text=True, timeout=120)
    assert "NOISE gemm_4bit_forward" in control.stderr  # unrouted, it reaches the console
    routed = subprocess.run(
        [sys.executable, "-c", run_main + emit], env=env, capture_output=True, text=True, timeout=120
    )
    assert routed.returncode == 0, routed.stderr
    assert "NOISE" not in routed.stdout + routed.stderr
    log = (tmp_path / "cache" / "logs" / "libraries.log").read_text()
    assert "NOISE gemm_4bit_forward" in log and "NOISE publisher trust" in log
