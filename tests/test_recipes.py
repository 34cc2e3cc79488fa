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
    assert find_recipe("temperature", model="smollm2-135m").name == "temperature/smollm2-135m-fitted"
