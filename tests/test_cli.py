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
        (["calibrate", "temperature", "smollm2-135m", "--data", "bb_general_knowledge"], 2, "needs perplexity"),
        (["calibrate", "act", "smollm2-135m", "--data", "bb_general_knowlege"], 2, "Did you mean"),
        (["calibrate", "act", "smollm2-135m", "--data", "/no/such.jsonl"], 2, "does not exist"),
        (["eval", "smollm2-135m", "--tasks", "bb_general_knowlege"], 2, "Did you mean 'bb_general_knowledge'"),
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
