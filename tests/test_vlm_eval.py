"""POPE / CHAIR evaluator (attnsurgery.eval.vision): metrics on hand-made predictions, table parsing and errors, and
a whole table (baseline vs VAR) run on a tiny random-weight LLaVA with a real LlavaProcessor built offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from vlm_tiny import IMAGE_TOKEN, tiny_vlm

from attnsurgery import AttnSurgeryError
from attnsurgery.eval.vision import run_vlm_table
from attnsurgery.eval.vision_metrics import (
    CHAIR_SYNONYMS,
    VLMEvalError,
    caption_objects,
    chair_metrics,
    chair_record,
    load_coco_objects,
    paired_bootstrap,
    pope_metrics,
    pope_parse,
    summarize,
)
from attnsurgery.eval.vision_tables import is_vlm_table, load_vlm_table, parse_vlm_table

ROOT = Path(__file__).resolve().parent.parent
WORDS = "yes no not there is a dog cat man table the in image cup pizza bear car , .".split()


# ------------------------------------------------------------------------------------------------ POPE
@pytest.mark.parametrize(
    "answer, parsed",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is not a dog in the image.", "no"),
        ("Yes. But no cat.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # the official script only knows 'No', 'no', 'not'
        ("", "yes"),
        ("Nothing", "yes"),
    ],
)
def test_pope_parse_like_official_script(answer, parsed):
    assert pope_parse(answer) == parsed


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "no", "no", "yes"]
    preds = ["yes", "no", "yes", "no", "yes"]  # tp 2, fn 1, fp 1, tn 1
    m = pope_metrics(labels, preds)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["F1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)  # share of *predicted* yes, as in POPE's script
    none = pope_metrics(["yes", "no"], ["no", "no"])
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["F1"] == 0.0


# ----------------------------------------------------------------------------------------------- CHAIR
def test_caption_objects_synonyms_plurals_and_special_cases():
    found = caption_objects(
        "Two men ride bikes past a fire hydrant. A baby elephant, hot dogs, wine glasses, knives and puppies; "
        "a toilet seat. Buses and a passenger train."
    )
    assert [c for _, c in found] == [
        "person", "bicycle", "fire hydrant", "elephant", "hot dog", "wine glass", "knife", "dog", "toilet", "bus",
        "train",
    ]  # fmt: skip
    assert caption_objects("A seat near a toilet") == [("toilet", "toilet")]  # 'seat' dropped next to toilet
    assert caption_objects("a chair and a seat") == [("chair", "chair"), ("seat", "chair")]
    assert caption_objects("nothing here, just sky") == []
    assert len(set(CHAIR_SYNONYMS.values())) == 80  # the 80 COCO categories


def test_chair_metrics_by_hand():
    gt = {"person", "dog"}
    records = [
        chair_record("A man with a dog.", gt),  # 2 mentions, 0 hallucinated, recalls both
        chair_record("A man, a cat and a cat.", gt),  # 3 mentions (repeats count), 2 hallucinated
        chair_record("A sunny day", gt),  # no objects
    ]
    assert records[1]["hallucinated_objects"] == ["cat"]
    m = chair_metrics(records)
    assert m["CHAIR_S"] == pytest.approx(100 / 3)
    assert m["CHAIR_I"] == pytest.approx(100 * 2 / 5)
    assert m["recall"] == pytest.approx(100 * 3 / 6)
    assert m["length"] == pytest.approx((5 + 7 + 3) / 3)


def test_seed_groups_average_and_spread():
    a = [{**chair_record("a dog", {"dog"}), "group": 0}, {**chair_record("a cat", {"dog"}), "group": 0}]
    b = [{**chair_record("a cat", {"dog"}), "group": 1}, {**chair_record("a cat", {"dog"}), "group": 1}]
    s = summarize("chair", a + b, iters=50)
    assert s["CHAIR_S"]["value"] == pytest.approx(75.0)  # mean of 50 and 100
    assert s["CHAIR_S"]["seed_std"] == pytest.approx(25.0)


def test_paired_bootstrap_identical_and_shifted():
    base = {str(i): {"label": i % 2, "pred": 1} for i in range(40)}
    same = paired_bootstrap("pope", base, dict(base), iters=200)
    assert same["accuracy"]["delta"] == 0.0 and same["accuracy"]["p"] == 1.0
    better = {k: {**v, "pred": v["label"]} for k, v in base.items()}
    d = paired_bootstrap("pope", base, better, iters=200)
    assert d["accuracy"]["delta"] == pytest.approx(50.0) and d["accuracy"]["p"] < 0.01
    assert d["yes_ratio"]["delta"] == pytest.approx(-50.0)


# ------------------------------------------------------------------------------------------ tiny data
def _images(folder: Path, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(1, n + 1):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


@pytest.fixture
def data(tmp_path, monkeypatch):
    """$COCO_ROOT (4 images, instances + captions) and $POPE_ROOT (3 splits of 6 questions)."""
    coco, pope = tmp_path / "coco", tmp_path / "pope"
    names = _images(coco / "val2014", 4)
    (coco / "annotations").mkdir()
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 47, "name": "cup"}]
    instances = {
        "images": [{"id": i + 1, "file_name": n} for i, n in enumerate(names)],
        "categories": cats,
        "annotations": [
            {"image_id": 1, "category_id": 1},
            {"image_id": 1, "category_id": 18},
            {"image_id": 2, "category_id": 47},
            {"image_id": 3, "category_id": 18},
        ],
    }
    captions = {"annotations": [{"image_id": 2, "caption": "A man holding a cup of coffee."}]}
    (coco / "annotations" / "instances_val2014.json").write_text(json.dumps(instances))
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps(captions))
    pope.mkdir()
    for split in ("random", "popular", "adversarial"):
        lines = [
            {
                "question_id": q + 1,
                "image": names[q % 4],
                "text": f"Is there a {obj} in the image?",
                "label": lab,
            }
            for q, (obj, lab) in enumerate(
                [("dog", "yes"), ("cup", "yes"), ("car", "no"), ("dog", "yes"), ("cat", "no"), ("bear", "no")]
            )
        ]
        (pope / f"coco_pope_{split}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    monkeypatch.setenv("COCO_ROOT", str(coco))
    monkeypatch.setenv("POPE_ROOT", str(pope))
    return tmp_path


def test_coco_ground_truth_from_instances_and_captions(data):
    gt = load_coco_objects(data / "coco" / "annotations", [1, 2, 3, 4])
    assert gt == {1: {"person", "dog"}, 2: {"cup", "person"}, 3: {"dog"}, 4: set()}
    assert load_coco_objects(data / "coco" / "annotations", [2], use_captions=False) == {2: {"cup"}}


def _processor():
    """A real LlavaProcessor for the tiny LLaVA: CLIP image processor (16 px) + a word-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    vocab.update({f"w{i}": i for i in range(len(vocab), 100)})
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def _table(folder: Path, published: list[dict] | None = None, **overrides) -> Path:
    # VAR on a random model: no massive activations, so a low tau on two channels (as in test_vlm.py)
    recipe = {
        "name": "var-tiny",
        "surgeries": [
            {"surgery": "var", "args": {"p": 0.3, "tau": 1.5, "summ": 0.05, "rho": 0.5, "sink_dims": [0, 1]}}
        ],
    }
    (folder / "var_tiny.yaml").write_text(yaml.safe_dump(recipe))
    table = {
        "kind": "vlm",
        "name": "tiny",
        "model": "tiny-llava",
        "dtype": "float32",
        "batch_size": 2,
        "arms": [{"name": "baseline"}, {"name": "var", "recipe": "var_tiny.yaml"}],
        "benchmarks": [
            {"name": f"POPE-{s}", "type": "pope", "questions": f"$POPE_ROOT/coco_pope_{s}.json",
             "images": "$COCO_ROOT/val2014", "max_new_tokens": 3}
            for s in ("random", "popular", "adversarial")
        ] + [
            {"name": "CHAIR", "type": "chair", "images": "$COCO_ROOT/val2014", "annotations": "$COCO_ROOT/annotations",
             "n_images": 3, "seeds": [0, 1], "max_new_tokens": 6}
        ],
    }  # fmt: skip
    if published is not None:
        (folder / "pub.yaml").write_text(yaml.safe_dump(published))
        table.update(published=["pub.yaml"], published_model="tiny")
    table.update(overrides)
    path = folder / "table.yaml"
    path.write_text(yaml.safe_dump(table, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def loaded():
    return tiny_vlm("llava"), _processor()


def test_run_table_baseline_vs_var_and_cache(data, loaded):
    published = [
        {"model": "tiny", "benchmark": "POPE", "setting": "baseline", "metric": "F1", "value": 84.98},
        {
            "model": "tiny",
            "benchmark": "CHAIR",
            "setting": "var",
            "metric": "CHAIR_S",
            "value": 33.3,
            "std": 1.3,
        },
        {"model": "other", "benchmark": "CHAIR", "setting": "var", "metric": "CHAIR_S", "value": 99.9},
    ]
    path = _table(data, published)
    assert is_vlm_table(path)
    out = data / "out"
    statuses: list[tuple[str, str, str]] = []
    paths = run_vlm_table(path, out_dir=out, limit=4, loaded=loaded, on_arm=lambda *a: statuses.append(a))
    assert set(paths) == {"json", "md", "png"} and all(p.is_file() for p in paths.values())
    assert ("var", "CHAIR", "done") in statuses
    report = json.loads(paths["json"].read_text())
    assert list(report["arms"]) == ["baseline", "var"]
    benches = {(r["benchmark"], r["metric"]) for r in report["table"]}
    assert ("POPE-random", "F1") in benches and ("POPE", "F1") in benches and ("CHAIR", "CHAIR_I") in benches
    pope = next(r for r in report["table"] if r["benchmark"] == "POPE-random" and r["metric"] == "accuracy")
    assert pope["n"] == 4 and set(pope["arms"]["var"]) >= {"value", "delta", "delta_stderr", "p"}
    chair = next(r for r in report["table"] if r["benchmark"] == "CHAIR" and r["metric"] == "CHAIR_S")
    assert chair["n"] == 6  # 3 images x 2 seeds
    assert {(p["arm"], p["value"]) for p in report["published"]} == {("baseline", 84.98), ("var", 33.3)}
    md = paths["md"].read_text()
    assert "Δ var" in md and "baseline: 84.98" in md and "var: 33.3 ± 1.3" in md and "99.9" not in md
    # random weights answer neither yes nor no: flagged, not silently scored as "yes"
    assert "INVALID" in md and "neither yes nor no" in md
    caches = sorted((out / "cache").glob("*.json"))
    assert len(caches) == 8  # 2 arms x 4 benchmarks
    texts = json.loads(caches[0].read_text())["texts"]
    assert texts and all(isinstance(t, str) for t in texts.values())

    statuses.clear()
    run_vlm_table(path, out_dir=out, limit=4, loaded=loaded, on_arm=lambda *a: statuses.append(a))
    assert {s for *_, s in statuses} == {"cached"}
    assert json.loads(paths["json"].read_text())["table"] == report["table"]
    statuses.clear()
    run_vlm_table(path, out_dir=out, limit=2, loaded=loaded, on_arm=lambda *a: statuses.append(a))
    assert ("baseline", "POPE-random", "done") in statuses  # other documents: another fingerprint
    statuses.clear()
    run_vlm_table(path, out_dir=out, limit=4, force=True, loaded=loaded, on_arm=lambda *a: statuses.append(a))
    assert "cached" not in {s for *_, s in statuses}


def test_surgery_is_patched_per_arm_and_removed(data, loaded, monkeypatch):
    import torch
    from vlm_tiny import prompt, vlm_inputs

    import attnsurgery.api as api

    model, _ = loaded
    inputs = vlm_inputs(model, [prompt(model, 2, 3)])
    with torch.no_grad():
        before = model(**inputs).logits
    handles = []

    def recording_patch(*args, **kwargs):
        handles.append(real(*args, **kwargs))
        return handles[-1]

    real = api.patch
    monkeypatch.setattr(api, "patch", recording_patch)
    run_vlm_table(_table(data), out_dir=data / "out2", limit=1, loaded=loaded)
    assert len(handles) == 4 and all(h.recipe.name == "var-tiny" and not h.active for h in handles)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_env_var_and_data_name_the_fix(data, loaded, monkeypatch):
    path = _table(data)
    monkeypatch.delenv("POPE_ROOT")
    with pytest.raises(VLMEvalError, match=r"\$POPE_ROOT is not set.*set POPE_ROOT"):
        run_vlm_table(path, out_dir=data / "o", loaded=loaded)
    monkeypatch.setenv("POPE_ROOT", str(data / "nowhere"))
    with pytest.raises(
        VLMEvalError, match=r"POPE data not found at .*nowhere.*coco_pope_random.json.*POPE_ROOT"
    ):
        run_vlm_table(path, out_dir=data / "o", loaded=loaded)
    monkeypatch.setenv("POPE_ROOT", str(data / "pope"))
    monkeypatch.setenv("COCO_ROOT", str(data / "nococo"))
    with pytest.raises(VLMEvalError, match=r"COCO.*COCO_ROOT"):
        run_vlm_table(path, out_dir=data / "o", loaded=loaded)
    monkeypatch.delenv("COCO_ROOT")
    with pytest.raises(VLMEvalError, match=r"\$COCO_ROOT is not set"):
        run_vlm_table(path, out_dir=data / "o", loaded=loaded)


def test_missing_images_and_bad_records(data, loaded):
    (data / "coco" / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(VLMEvalError, match="images are missing"):
        run_vlm_table(_table(data), out_dir=data / "o", loaded=loaded)
    (data / "pope" / "coco_pope_random.json").write_text('{"question_id": 1, "text": "Is there a dog?"}\n')
    with pytest.raises(VLMEvalError, match="not an official POPE record"):
        run_vlm_table(_table(data), out_dir=data / "o", loaded=loaded)


GOOD = {
    "kind": "vlm",
    "name": "t",
    "model": "m",
    "arms": ["baseline"],
    "benchmarks": [{"type": "pope", "questions": "q.json", "images": "i"}],
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": None}, "`kind` must be 'vlm'"),
        ({"modle": "x"}, "unknown key 'modle'. Did you mean 'model'"),
        ({"arms": [{"name": "var", "recipe": "var/llava-1.5-7b"}]}, "first arm must be the baseline"),
        ({"arms": ["baseline", {"name": "x", "recipe": "vhr", "layer": 1}]}, "unknown key 'layer'"),
        ({"benchmarks": [{"type": "mme", "images": "i"}]}, "unknown type 'mme'"),
        ({"benchmarks": [{"type": "pope", "images": "i"}]}, "needs `questions`"),
        (
            {"benchmarks": [{"type": "chair", "images": "i", "annotations": "a", "seeds": 3}]},
            "`seeds` must be",
        ),
        (
            {"benchmarks": [{"type": "pope", "questions": "q", "images": "i", "prompt": "{question}"}]},
            "<image>",
        ),
        (
            {"benchmarks": [{"type": "pope", "questions": "q", "images": "i", "max_new_tokens": 0}]},
            "positive",
        ),
        ({"published": ["nope.yaml"]}, "published file .*nope.yaml does not exist"),
    ],
)
def test_malformed_tables(change, message):
    data = {**GOOD, **change}
    with pytest.raises(VLMEvalError, match=message):
        parse_vlm_table(data, "t.yaml", Path("/nonexistent"))


def test_unknown_recipe_fails_before_data(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "arms": ["baseline", {"name": "x", "recipe": "var/nope"}]}))
    with pytest.raises(AttnSurgeryError, match="unknown recipe"):
        run_vlm_table(path, out_dir=tmp_path / "o")


def test_shipped_tables_parse_and_resolve(monkeypatch):
    monkeypatch.delenv("POPE_ROOT", raising=False)
    for name, arm, setting in [("var_llava15", "var", "baseline"), ("vhr_llava15", "vhr", "greedy")]:
        path = ROOT / "evals" / "vlm" / f"{name}.yaml"
        assert is_vlm_table(path)
        table = load_vlm_table(path)
        assert table.model == "llava-hf/llava-1.5-7b-hf"
        arms = table.resolve_arms()
        assert [a.name for a in arms] == ["baseline", arm] and arms[1].recipe.surgeries[0].surgery == arm
        assert table.arms[0]["setting"] == setting
        assert [b.name for b in table.benchmarks] == [
            "POPE-random",
            "POPE-popular",
            "POPE-adversarial",
            "CHAIR",
        ]
        chair = table.benchmarks[-1].settings
        assert chair["max_new_tokens"] == 512 and "Please describe this image in detail." in chair["prompt"]
        with pytest.raises(VLMEvalError, match="POPE_ROOT"):
            run_vlm_table(path, out_dir="/nonexistent")
    vhr = load_vlm_table(ROOT / "evals" / "vlm" / "vhr_llava15.yaml")
    assert any(p["benchmark"] == "POPE" and p["metric"] == "F1" for p in vhr.published)
    assert not is_vlm_table(ROOT / "evals" / "mini.yaml") and not is_vlm_table(ROOT / "missing.yaml")
