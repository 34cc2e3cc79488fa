"""`pip install .` and `pip install -e .` both ship patches/ and recipes/ inside the package.

Each install goes into a fresh venv; the heavy dependencies (torch, transformers) are borrowed from the test
environment through a .pth file placed after the venv's own site-packages, so the fresh install wins.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

CHECK = """
import importlib.resources, sys, torch
import attnsurgery, attnsurgery.patches
from attnsurgery import list_recipes, list_surgeries, patch
from transformers import LlamaConfig, LlamaForCausalLM
print(attnsurgery.__file__)
print(attnsurgery.patches.__file__)
assert {s.name for s in list_surgeries()} >= {"temperature", "head_scale", "clipped_softmax"}
assert "temperature/default" in list_recipes()
from attnsurgery import find_recipe
for name in list_recipes():  # every recipe parses, so every state file a trained recipe names was installed
    find_recipe(name)
assert any(find_recipe(n).training.get("point") for n in list_recipes())  # the trained recipes ship
assert importlib.resources.files("attnsurgery.recipes").joinpath("temperature/default.yaml").is_file()
assert {s.name for s in list_surgeries()} == set(EXPECTED_SURGERIES), sorted(s.name for s in list_surgeries())
from attnsurgery.tasks import include_path, load_split, offline_tasks
assert "bb_general_knowledge" in offline_tasks() and load_split("bb_general_knowledge", "test")
assert sys.prefix in include_path() or "evals" in include_path()
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1))
ids = torch.randint(0, 32, (1, 6))
with torch.no_grad():
    ref = model(ids).logits
    with patch(model, "clipped_softmax/default"):
        assert not torch.equal(model(ids).logits, ref)
    assert torch.equal(model(ids).logits, ref)
print("ok")
"""


def _patch_folders() -> list[str]:
    return sorted(p.name for p in (REPO / "patches").iterdir() if (p / "__init__.py").is_file())


def test_every_patch_folder_is_a_listed_package():
    """pyproject lists packages explicitly (patches/ installs as attnsurgery.patches): a new surgery folder that is
    not listed would work in a development checkout and be missing from every wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = [
        f"attnsurgery.patches.{name}"
        for name in _patch_folders()
        if f"attnsurgery.patches.{name}" not in listed
    ]
    assert not missing, f"add to pyproject.toml [tool.setuptools] packages: {missing}"


def _source_copy(tmp: Path) -> Path:
    """The tracked files only, so the build sees what a clean clone has."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    src = tmp / "src"
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    return src


def _venv(path: Path) -> Path:
    # no pip/setuptools of its own: the build backend and installer come from the test environment
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    borrowed = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    Path(purelib, "zz_borrowed_deps.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")
    return python


def _pip(python: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args], check=True)


def _run_outside(python: Path, tmp: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    cwd = tmp / "elsewhere"
    cwd.mkdir(exist_ok=True)
    check = f"EXPECTED_SURGERIES = {_patch_folders()!r}\n" + CHECK  # every surgery folder, installed
    out = subprocess.run([str(python), "-c", check], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    cli = subprocess.run(
        [str(python.parent / "attnsurgery"), "list"], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "clipped_softmax/default" in cli.stdout
    return out.stdout.split()


def test_wheel_install(tmp_path):
    src = _source_copy(tmp_path)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("attnsurgery-*.whl")
    python = _venv(tmp_path / "venv")
    _pip(python, "install", "--no-deps", "-q", str(wheel))
    lines = _run_outside(python, tmp_path)
    assert str(tmp_path / "venv") in lines[0] and str(tmp_path / "venv") in lines[1]
    assert lines[-1] == "ok"


def test_editable_install(tmp_path):
    src = _source_copy(tmp_path)
    python = _venv(tmp_path / "venv")
    _pip(python, "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(src))
    lines = _run_outside(python, tmp_path)
    assert lines[0].startswith(str(src / "attnsurgery")) and lines[1].startswith(str(src / "patches"))
    assert lines[-1] == "ok"
