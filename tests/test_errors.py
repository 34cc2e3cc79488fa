"""Bad input fails early with a message that names the problem and the fix, and leaves nothing behind."""

from __future__ import annotations

import pytest
import torch
from tiny import random_ids, tiny_model
from torch import nn

from attnsurgery import (
    RecipeError,
    SurgeryConfigError,
    UnknownSurgeryError,
    UnsupportedModelError,
    find_recipe,
    patch,
)
from attnsurgery.recipe import load_recipe_file


def untouched(model):
    attrs = [a for m in model.modules() for a in vars(m) if a.startswith("attnsurgery")]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    return not attrs and hooks == 0 and model.config._attn_implementation == "sdpa"


@pytest.fixture
def model():
    return tiny_model("llama")


def test_unknown_surgery_did_you_mean(model):
    with pytest.raises(
        UnknownSurgeryError, match=r"unknown surgery 'temprature'.*Did you mean 'temperature'"
    ):
        patch(model, "temprature")
    assert untouched(model)


@pytest.mark.parametrize(
    "surgery, args, message",
    [
        ("temperature", {"tau": 0.0}, r"tau=0.0 is out of range.*\(0.0, inf\)"),
        ("temperature", {"tau": [1.0, -1.0, 1.0, 1.0]}, r"tau=-1.0 is out of range"),
        ("temperature", {"c": -0.1}, r"c=-0.1 is below min_c=0.0"),
        ("temperature", {"c": 0.1, "beta": 2.0}, r"c or as beta, not both"),
        ("temperature", {"tau": [1.0, 0.5]}, r"needs 4 values \(one per query head\)"),
        ("temperature", {"taus": 0.5}, r"unknown argument 'taus'.*Did you mean 'tau'"),
        ("clipped_softmax", {"gamma": 0.1}, r"gamma=0.1 is out of range.*\[-1.0, 0.0\]"),
        ("clipped_softmax", {"zeta": 0.9}, r"zeta=0.9 is out of range"),
        ("head_scale", {"scale": -1}, r"scale=-1.0 is out of range"),
    ],
)
def test_bad_arguments(model, surgery, args, message):
    with pytest.raises(SurgeryConfigError, match=message):
        patch(model, surgery, **args)
    assert untouched(model)


@pytest.mark.parametrize(
    "targets, message",
    [
        ({"layers": "2:40"}, r"reaches past this model's 3 layers"),
        ({"layers": 5}, r"layer 5 is out of range; this model has 3 layers"),
        ({"layers": "a:b"}, r"not a slice"),
        ({"heads": [0, 9]}, r"head 9 is out of range; this model has 4 query heads"),
        ({"heads": {7: [0]}}, r"layer 7 is out of range"),
        ({"heads": {1: [0]}, "layers": [0]}, r"outside layers"),
    ],
)
def test_bad_targets(model, targets, message):
    with pytest.raises(SurgeryConfigError, match=message):
        patch(model, "temperature", tau=0.5, **targets)
    assert untouched(model)


def test_two_normalisers_on_one_layer_conflict(model):
    first = patch(model, "clipped_softmax", gamma=-0.01, layers="0:2")

    class OtherNorm(type(first.surgeries[0])):
        name = "other_norm"

    from attnsurgery.engine import Engine
    from attnsurgery.targeting import resolve_targets

    engine = Engine.of(model)
    clash = OtherNorm(first.surgeries[0].config, resolve_targets("1:", None, 3, 4))
    with pytest.raises(SurgeryConfigError, match=r"layer 1: 'clipped_softmax' and 'other_norm' both replace"):
        engine.add(clash)
    ids = random_ids(1, 8)
    with torch.no_grad():
        still = model(ids).logits
    first.remove()
    assert untouched(model)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, still)


def test_unsupported_model():
    with pytest.raises(UnsupportedModelError, match="not a transformers PreTrainedModel"):
        patch(nn.Linear(4, 4), "temperature")


def test_architecture_without_attention_seam():
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UnsupportedModelError, match="found no self-attention modules"):
        patch(mamba, "temperature")


def test_malformed_recipes(tmp_path):
    cases = {
        "unknown_key.yaml": (
            "surgeries: [temperature]\nmodle: x\n",
            r"unknown key 'modle'.*Did you mean 'model'",
        ),
        "no_surgeries.yaml": ("name: x\n", r"'surgeries' must be a non-empty list"),
        "bad_yaml.yaml": ("surgeries: [temperature\n", r"not valid YAML"),
        "not_mapping.yaml": ("- temperature\n", r"must be a YAML mapping"),
        "unknown_surgery.yaml": ("surgeries:\n  - surgery: temprature\n", r"unknown surgery 'temprature'"),
        "bad_arg.yaml": (
            "surgeries:\n  - surgery: temperature\n    args: {tau: -1}\n",
            r"tau=-1.0 is out of range",
        ),
        "bad_entry_key.yaml": (
            "surgeries:\n  - surgery: temperature\n    arg: {tau: 1}\n",
            r"unknown key 'arg'",
        ),
        "missing_state.yaml": (
            "surgeries:\n  - surgery: temperature\n    state: nope.safetensors\n",
            r"state file .*nope.safetensors does not exist",
        ),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(RecipeError, match=message):
            load_recipe_file(path)


def test_unknown_recipe_and_missing_file(model):
    with pytest.raises(RecipeError, match=r"unknown recipe 'temperature/sharp'.*Did you mean"):
        find_recipe("temperature/sharp")
    with pytest.raises(RecipeError, match=r"does not exist"):
        patch(model, "missing/recipe.yaml")
    assert untouched(model)


def test_failed_recipe_leaves_nothing_half_applied(model, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "surgeries:\n  - surgery: temperature\n    args: {tau: 0.5}\n"
        "  - surgery: head_scale\n    args: {scale: 0.5}\n    heads: [0, 11]\n"
    )
    with pytest.raises(SurgeryConfigError, match="head 11 is out of range"):
        patch(model, path)
    assert untouched(model)
