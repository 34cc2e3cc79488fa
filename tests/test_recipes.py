from __future__ import annotations

import torch
from tiny import random_ids, tiny_model

from attnsurgery import find_recipe, list_recipes, patch


def test_shipped_recipes_all_parse():
    names = list_recipes()
    assert "temperature/default" in names and "clipped_softmax/default" in names
    for name in names:
        recipe = find_recipe(name)
        assert recipe.surgeries and recipe.description


def test_recipe_by_folder_name_and_overrides():
    model = tiny_model("llama")
    ids = random_ids(1, 10)
    with patch(model, "temperature") as identity:  # the surgery name wins over the recipe folder
        assert identity.recipe is None
    with torch.no_grad():
        with patch(model, "temperature/default") as handle:
            assert handle.recipe.name == "temperature/default"
            a = model(ids).logits
        with patch(model, "temperature", tau=0.9):
            b = model(ids).logits
        with patch(model, "temperature/default", tau=0.5) as handle:
            assert handle.surgeries[0].config.tau == 0.5
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_recipe_with_state_file(tmp_path):
    from attnsurgery import save_surgery

    model = tiny_model("llama")
    ids = random_ids(1, 10)
    with patch(model, "head_scale", trainable=True) as handle:
        with torch.no_grad():
            handle.surgeries[0].scale[1, 2] = 0.25
            expected = model(ids).logits
        save_surgery(handle, tmp_path)
    (tmp_path / "recipe.yaml").write_text(
        "name: learned\ndescription: learned gates\nsurgeries:\n  - surgery: head_scale\n"
        "    args: {trainable: true}\n    state: attnsurgery_state.safetensors\n"
    )
    # the state file keys carry the surgery index prefix; a recipe's state is that surgery's own tensors
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "attnsurgery_state.safetensors"))
    save_file(
        {k.split(".", 1)[1]: v for k, v in tensors.items()}, str(tmp_path / "attnsurgery_state.safetensors")
    )
    with patch(model, tmp_path / "recipe.yaml"), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)


def test_model_named_recipe_wins_over_its_variants():
    # act/gemma3-270m-fdr.yaml sorts before act/gemma3-270m.yaml and is made for the same model
    assert find_recipe("act", model="gemma3-270m").name == "act/gemma3-270m"
    assert find_recipe("act/gemma3-270m-fdr").model == "gemma3-270m"
    # no temperature recipe is made for SmolLM2 (its fit did not beat the identity on held-out text): the default
    assert find_recipe("temperature", model="smollm2-135m").name == "temperature/default"


def _temperature_recipe(tmp_path, coef, args=""):
    from safetensors.torch import save_file

    save_file({"inv_tau": torch.ones_like(coef), "coef": coef}, str(tmp_path / "t.safetensors"))
    (tmp_path / "recipe.yaml").write_text(
        "name: t\ndescription: fitted\nsurgeries:\n  - surgery: temperature\n"
        + (f"    args: {args}\n" if args else "")
        + "    state: t.safetensors\n"
    )
    return tmp_path / "recipe.yaml"


def test_state_files_cannot_bypass_argument_ranges(tmp_path):
    """A recipe's state file is checked like the arguments: c below min_c (0 unless the recipe says otherwise),
    non-finite values and negative head scales are refused with the reason, and the model is left unpatched."""
    import pytest

    from attnsurgery.errors import SurgeryConfigError

    model = tiny_model("llama")
    ids = random_ids(1, 10)
    with torch.no_grad():
        before = model(ids).logits
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    coef = torch.zeros(L, H)
    coef[1] = -0.02
    with pytest.raises(SurgeryConfigError, match="below min_c=0.0"):
        patch(model, _temperature_recipe(tmp_path, coef))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # nothing left half-installed
    # the bound the table was fitted under travels in the recipe's args
    with patch(model, _temperature_recipe(tmp_path, coef, "{min_c: -0.05}")), torch.no_grad():
        assert not torch.equal(model(ids).logits, before)
    # ... but not past the point where 1 + c log(n) reaches 0 within the model's context
    deep = coef.clone()
    deep[1] = -0.5  # 1 - 0.5 log(max_position_embeddings) < 0
    with pytest.raises(SurgeryConfigError, match="reach 0 within"):
        patch(model, _temperature_recipe(tmp_path, deep, "{min_c: -0.9}"))
    nan = coef.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(SurgeryConfigError, match="non-finite"):
        patch(model, _temperature_recipe(tmp_path, nan, "{min_c: -0.05}"))
    # the argument path says the same
    with pytest.raises(SurgeryConfigError, match="below min_c"):
        patch(model, "temperature", c=-0.01)
    with pytest.raises(SurgeryConfigError, match="out of range"):
        patch(model, "temperature", min_c=0.1)
    with patch(model, "head_scale", trainable=True) as handle:
        with torch.no_grad():
            handle.surgeries[0].scale[1, 2] = -1.0
        from attnsurgery import save_surgery

        save_surgery(handle, tmp_path / "hs")
    from attnsurgery import load_surgery

    with pytest.raises(SurgeryConfigError, match="must be >= 0"):
        load_surgery(model, tmp_path / "hs")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_signed_gemma_experiment_recipe_declares_its_bound():
    """The Gemma-3 experiment fitted with c < 0 parses with the bound it was fitted under (min_c -0.05)."""
    recipe = find_recipe("evals/experiments/temperature-gemma3-270m-signed.yaml")
    assert recipe.surgeries[0].args["min_c"] == -0.05
