"""POPE and CHAIR for vision-language models: baseline vs patched arms, side by side with published numbers.

lm-eval has neither benchmark, so this is a small evaluator of its own, kept close to the official scripts:

- **POPE** (Li et al. 2023): yes/no questions "Is there a <object> in the image?" over COCO val2014, in the
  official JSONL format (``{"question_id", "image", "text", "label"}``), greedy decoding, answers parsed like the
  official script (first sentence; ``no``/``No``/``not`` as a word means "no", anything else "yes"), metrics
  accuracy, precision, recall, F1 (positive class "yes") and the ratio of "yes" predictions, all in percent.
- **CHAIR** (Rohrbach et al. 2018): a detailed caption per COCO val2014 image, object mentions found through the
  standard synonym list (80 COCO categories), compared with the image's ground-truth objects (instance
  annotations plus objects mentioned in its reference captions, as in the original ``chair.py``).
  ``CHAIR_S`` = % of captions with a hallucinated object, ``CHAIR_I`` = % of object mentions that are
  hallucinated, ``recall`` = % of ground-truth objects mentioned, ``length`` = words per caption.

A table definition is a YAML file with ``kind: vlm`` (``evals/vlm/*.yaml``). :func:`run_vlm_table` loads the
model once, runs every arm (the baseline, then each recipe patched and removed again) on every benchmark, caches
each (arm, benchmark) generation run by a fingerprint, and writes ``table.json``, ``table.md`` and ``table.png``.
Deltas against the baseline are paired (the same questions / images): a paired bootstrap over documents.
See ``docs/vlm.md`` ("Evaluating: POPE and CHAIR").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelNotFoundError, did_you_mean
from .evaluate import Arm, EvalError, _p_label, _slug
from .recipe import find_recipe

CACHE_FORMAT = 1
BOOTSTRAP_ITERS = 2000

#: LLaVA-1.5's own POPE prompt (``llava_pope_test.jsonl``: the question + "\nAnswer the question using a single
#: word or phrase.") in the llava-hf chat format
POPE_PROMPT = "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:"
#: the CHAIR prompt of VHR (and OPERA / VCD before it), max 512 new tokens
CHAIR_PROMPT = "USER: <image>\nPlease describe this image in detail. ASSISTANT:"

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_METRICS = ("accuracy", "precision", "recall", "F1", "yes_ratio")
CHAIR_METRICS = ("CHAIR_S", "CHAIR_I", "recall", "length")
LOWER_IS_BETTER = {"CHAIR_S", "CHAIR_I"}
_PRIMARY = {"pope": ["F1"], "chair": ["CHAIR_S", "CHAIR_I"]}

POPE_HELP = (
    "download the POPE question files from the POPE repository (github.com/AoiDragon/POPE, "
    "output/coco/coco_pope_{random,popular,adversarial}.json) into one folder and set POPE_ROOT to it"
)
COCO_HELP = (
    "download COCO 2014 (cocodataset.org: val2014.zip and annotations_trainval2014.zip) and set COCO_ROOT "
    "so that $COCO_ROOT/val2014/ holds the images and $COCO_ROOT/annotations/ holds instances_val2014.json "
    "and captions_val2014.json"
)


class VLMEvalError(EvalError):
    """Bad VLM evaluation input: malformed table, missing data, unset environment variable."""


# ================================================================================================ POPE
def pope_parse(answer: str) -> str:
    """``"yes"``/``"no"`` as the official POPE script reads a free-form answer.

    Only the first sentence counts, commas are dropped, and the answer is "no" when one of its space-separated
    words is ``No``, ``no`` or ``not``; everything else (including an empty or garbled answer) is "yes".
    """
    text = answer
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_answered(answer: str) -> bool:
    """Whether an answer says yes or no at all (the official parsing counts anything else as "yes")."""
    words = re.findall(r"[a-z]+", answer.lower())
    return any(w in ("yes", "no", "not") for w in words)


def _pope_values(arrays: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    label, pred = arrays["label"], arrays["pred"]  # 1 = yes
    n = label.shape[-1]
    tp = (label * pred).sum(-1)
    fp = ((1 - label) * pred).sum(-1)
    fn = (label * (1 - pred)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": 100.0 * (label == pred).sum(-1) / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "F1": 100.0 * f1,
        "yes_ratio": 100.0 * pred.sum(-1) / n,
    }


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio (percent) of parsed predictions vs labels."""
    import numpy as np

    if len(labels) != len(predictions) or not labels:
        raise VLMEvalError("pope_metrics needs as many predictions as labels, and at least one.")
    arrays = {
        "label": np.array([x == "yes" for x in labels], dtype=np.float64),
        "pred": np.array([x == "yes" for x in predictions], dtype=np.float64),
    }
    return {k: float(v) for k, v in _pope_values(arrays).items()}


# =============================================================================================== CHAIR
# The CHAIR synonym list (synonyms.txt of Rohrbach et al. 2018, LisaAnne/Hallucination), one COCO category per
# line, first word = the category. Taken from the copy in the MIT-licensed PyPI package lmms-eval 0.7.3
# (lmms_eval/tasks/coco_cap_chair/utils.py). Its quirks are kept on purpose, since published numbers were
# computed with them: " motor bike" and " cheesecake" carry a leading space (so they never match) and "iPhone"
# is capitalised (captions are lower-cased, so it never matches either).
_SYNONYMS_TXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, \
sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, \
gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, foreigner, caller, offender, coworker, \
trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, \
teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, \
pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, \
paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, \
finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, \
kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, \
rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, \
vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, \
labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, \
retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, goat, ewe
cow, cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""


def _synonyms() -> dict[str, str]:
    inverse: dict[str, str] = {}
    for line in _SYNONYMS_TXT.strip("\n").split("\n"):
        words = line.split(", ")
        for word in words:
            inverse[word] = words[0]
    return inverse


#: synonym -> COCO category (the original's ``inverse_synonym_dict``)
CHAIR_SYNONYMS = _synonyms()
_DOUBLE_WORDS: dict[str, str] = {
    w: w
    for w in (
        "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
        "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
        "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
        "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
    )
}  # fmt: skip
for _w in (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
):
    # 'baby bird' is a bird, not a person
    _DOUBLE_WORDS[f"baby {_w}"] = _w
    _DOUBLE_WORDS[f"adult {_w}"] = _w
for _w in ("jet", "train"):
    _DOUBLE_WORDS[f"passenger {_w}"] = _w  # 'passenger jet' is no person either
_DOUBLE_WORDS.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
#: every word that can take part in a match: singularisation only ever maps onto these
_VOCAB = {part for phrase in [*CHAIR_SYNONYMS, *_DOUBLE_WORDS] for part in phrase.split()}
_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose", "oxen": "ox",
    "people": "person", "policemen": "policeman", "gentlemen": "gentleman", "servicemen": "serviceman",
    "feet": "foot", "teeth": "tooth", "wives": "wife", "knives": "knife", "calves": "calf", "halves": "half",
}  # fmt: skip
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def _singular(word: str) -> str:
    """The singular of ``word`` when it is the plural of a CHAIR vocabulary word, else ``word`` unchanged."""
    if word in _VOCAB:
        return word
    candidates = [_IRREGULAR.get(word, "")]
    if word.endswith("ies"):
        candidates.append(word[:-3] + "y")
    if word.endswith("ves"):
        candidates += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        candidates.append(word[:-2])
    if word.endswith("s"):
        candidates.append(word[:-1])
    for c in candidates:
        if c in _VOCAB:
            return c
    return word


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """``(word, category)`` for every COCO object mention in ``caption``, in order (repeats kept).

    The original's steps: lower-case, tokenize, singularize, merge two-word phrases (``hot dog``, ``baby
    bird`` -> ``bird``, ``toilet seat`` -> ``toilet``), drop ``seat`` when ``toilet`` is mentioned, keep the words
    in the synonym list and map them to their category.
    """
    words = [_singular(w) for w in _TOKEN.findall(caption.lower())]
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if i + 1 < len(words) and pair in _DOUBLE_WORDS:
            merged.append(_DOUBLE_WORDS[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [w for w in merged if w != "seat"]
    return [(w, CHAIR_SYNONYMS[w]) for w in merged if w in CHAIR_SYNONYMS]


def chair_record(caption: str, gt_objects: set[str]) -> dict[str, Any]:
    """Per-caption counts that CHAIR aggregates (and the words behind them, for inspection)."""
    mentions = caption_objects(caption)
    hallucinated = [cat for _, cat in mentions if cat not in gt_objects]
    mentioned = {cat for _, cat in mentions}
    return {
        "mentions": len(mentions),
        "hallucinated": len(hallucinated),
        "gt": len(gt_objects),
        "recalled": len(mentioned & gt_objects),
        "words": len(caption.split()),
        "hallucinated_objects": sorted(set(hallucinated)),
    }


def _chair_values(arrays: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    mentions, hall = arrays["mentions"].sum(-1), arrays["hallucinated"].sum(-1)
    gt, rec = arrays["gt"].sum(-1), arrays["recalled"].sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "CHAIR_S": 100.0 * (arrays["hallucinated"] > 0).mean(-1),
            "CHAIR_I": np.where(mentions > 0, 100.0 * hall / np.maximum(mentions, 1), 0.0),
            "recall": np.where(gt > 0, 100.0 * rec / np.maximum(gt, 1), 0.0),
            "length": arrays["words"].mean(-1),
        }


def chair_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """CHAIR_S, CHAIR_I, recall (percent) and mean caption length (words) over :func:`chair_record` outputs."""
    if not records:
        raise VLMEvalError("chair_metrics needs at least one caption.")
    arrays = _arrays("chair", records)
    return {k: float(v) for k, v in _chair_values(arrays).items()}


def load_coco_objects(
    annotations: str | Path, image_ids: Sequence[int] | None = None, *, use_captions: bool = True
) -> dict[int, set[str]]:
    """Ground-truth CHAIR categories per image: instance annotations (+ objects named in reference captions).

    ``annotations`` is the folder with ``instances_val2014.json`` (and ``captions_val2014.json``).
    """
    folder = Path(annotations)
    inst = folder / "instances_val2014.json"
    caps = folder / "captions_val2014.json"
    for f in [inst, caps] if use_captions else [inst]:
        if not f.is_file():
            raise VLMEvalError(f"COCO annotations not found: {f} does not exist. To fix: {COCO_HELP}.")
    data = json.loads(inst.read_text())
    keep = set(image_ids) if image_ids is not None else {int(im["id"]) for im in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, set[str]] = {i: set() for i in keep}
    for ann in data["annotations"]:
        imid = int(ann["image_id"])
        name = names[ann["category_id"]]
        if imid in objects and name in CHAIR_SYNONYMS:
            objects[imid].add(CHAIR_SYNONYMS[name])
    if use_captions:
        for ann in json.loads(caps.read_text())["annotations"]:
            imid = int(ann["image_id"])
            if imid in objects:
                objects[imid].update(cat for _, cat in caption_objects(ann["caption"]))
    return objects


# ====================================================================================== statistics
_KEYS = {"pope": ("label", "pred"), "chair": ("mentions", "hallucinated", "gt", "recalled", "words")}
_VALUES = {"pope": _pope_values, "chair": _chair_values}


def _arrays(kind: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    return {k: np.array([float(r[k]) for r in records], dtype=np.float64) for k in _KEYS[kind]}


def _grouped(kind: str, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r.get("group", 0), []).append(r)
    return [_arrays(kind, g) for _, g in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def _resampled(kind: str, groups: list[dict[str, Any]], idx: list[Any] | None) -> dict[str, Any]:
    """Metric values (mean over groups, e.g. CHAIR seeds) of the data or of bootstrap resamples ``idx``."""
    import numpy as np

    per_group = []
    for g, arrays in enumerate(groups):
        sub = arrays if idx is None else {k: v[idx[g]] for k, v in arrays.items()}
        per_group.append(_VALUES[kind](sub))
    return {m: np.mean([pg[m] for pg in per_group], axis=0) for m in per_group[0]}


def summarize(
    kind: str, records: Sequence[dict[str, Any]], iters: int = BOOTSTRAP_ITERS
) -> dict[str, dict[str, float | None]]:
    """``{metric: {"value", "stderr", "seed_std"}}``: the value is the mean over groups (CHAIR seeds; POPE has
    one), the stderr a bootstrap over documents within groups, ``seed_std`` the spread over groups."""
    import numpy as np

    groups = _grouped(kind, records)
    point = _resampled(kind, groups, None)
    rng = np.random.default_rng(0)
    idx = [
        rng.integers(0, len(next(iter(g.values()))), size=(iters, len(next(iter(g.values())))))
        for g in groups
    ]
    boot = _resampled(kind, groups, idx)
    n = len(records)
    per_group = [_VALUES[kind](g) for g in groups]
    out: dict[str, dict[str, float | None]] = {}
    for m, value in point.items():
        out[m] = {
            "value": float(value),
            "stderr": float(np.std(boot[m], ddof=1)) if n > 1 else None,
            "seed_std": float(np.std([pg[m] for pg in per_group])) if len(groups) > 1 else None,
        }
    return out


def paired_bootstrap(
    kind: str,
    base: dict[str, dict[str, Any]],
    other: dict[str, dict[str, Any]],
    iters: int = BOOTSTRAP_ITERS,
) -> dict[str, dict[str, Any]]:
    """``{metric: {"delta", "delta_stderr", "p", "n"}}`` of ``other`` minus ``base`` over the documents both
    scored: the same bootstrap resamples of documents for both arms (fixed seed), two-sided p-value."""
    import numpy as np

    docs = sorted(set(base) & set(other))
    if not docs:
        return {}
    a_groups, b_groups = _grouped(kind, [base[d] for d in docs]), _grouped(kind, [other[d] for d in docs])
    delta = {
        m: float(v - _resampled(kind, a_groups, None)[m]) for m, v in _resampled(kind, b_groups, None).items()
    }
    rng = np.random.default_rng(0)
    sizes = [len(next(iter(g.values()))) for g in a_groups]
    idx = [rng.integers(0, s, size=(iters, s)) for s in sizes]
    a_boot, b_boot = _resampled(kind, a_groups, idx), _resampled(kind, b_groups, idx)
    out = {}
    for m in delta:
        d = b_boot[m] - a_boot[m]
        se = float(d.std(ddof=1)) if len(docs) > 1 else None
        p = float(min(1.0, max(2 * min((d <= 0).mean(), (d >= 0).mean()), 1.0 / iters)))
        out[m] = {"delta": delta[m], "delta_stderr": se, "p": p, "n": len(docs)}
    return out


# ========================================================================================== tables
_TABLE_KEYS = {
    "kind", "name", "description", "requires", "notes", "model", "dtype", "batch_size", "arms", "benchmarks",
    "published", "published_model",
}  # fmt: skip
_ARM_KEYS = {"name", "recipe", "setting"}
_BENCH_KEYS = {
    "pope": {"name", "type", "questions", "images", "prompt", "max_new_tokens", "batch_size", "limit"},
    "chair": {
        "name", "type", "images", "annotations", "prompt", "max_new_tokens", "batch_size", "limit", "n_images",
        "seeds", "use_captions",
    },
}  # fmt: skip
_BENCH_DEFAULTS = {
    "pope": {"prompt": POPE_PROMPT, "max_new_tokens": 16},
    "chair": {
        "prompt": CHAIR_PROMPT,
        "max_new_tokens": 512,
        "n_images": 500,
        "seeds": [0],
        "use_captions": True,
    },
}


@dataclass
class Benchmark:
    name: str
    type: str  # "pope" | "chair"
    settings: dict[str, Any]


@dataclass
class VLMTable:
    """A ``kind: vlm`` table: one model x arms x POPE/CHAIR benchmarks (schema in ``docs/vlm.md``)."""

    name: str
    model: str
    arms: list[dict[str, Any]]  # {"name", "recipe": str | None, "setting": str}
    benchmarks: list[Benchmark]
    dtype: str = "float16"
    batch_size: int = 8
    published: list[dict[str, Any]] = field(default_factory=list)
    published_files: list[str] = field(default_factory=list)
    published_model: str | None = None
    description: str = ""
    requires: str = ""
    notes: str = ""
    path: Path | None = None

    def resolve_arms(self) -> list[Arm]:
        return [Arm(a["name"], None if a["recipe"] is None else find_recipe(a["recipe"])) for a in self.arms]


def _err(source: str, problem: str) -> VLMEvalError:
    return VLMEvalError(f"VLM table {source}: {problem}")


def _unknown(source: str, where: str, data: dict, allowed: set[str]) -> None:
    bad = sorted(set(data) - allowed)
    if bad:
        raise _err(
            source,
            f"{where} has unknown key {bad[0]!r}.{did_you_mean(bad[0], allowed)} Allowed: {', '.join(sorted(allowed))}.",
        )


def parse_vlm_table(data: Any, source: str = "<table>", base_dir: Path | None = None) -> VLMTable:
    """Validate a ``kind: vlm`` table (keys, arms, benchmarks, published files) with errors naming the fix."""
    if not isinstance(data, dict):
        raise _err(source, "must be a YAML mapping with kind: vlm, name, model, arms, benchmarks.")
    if data.get("kind") != "vlm":
        raise _err(
            source, f"`kind` must be 'vlm' (got {data.get('kind')!r}); text tables go to evaluate.reproduce."
        )
    _unknown(source, "the table", data, _TABLE_KEYS)
    for key in ("name", "model", "arms", "benchmarks"):
        if key not in data:
            raise _err(source, f"missing required key {key!r}.")
    if not isinstance(data["model"], str) or not data["model"]:
        raise _err(source, "`model` must be one hub id, local path or alias (e.g. llava-hf/llava-1.5-7b-hf).")
    arms = data["arms"]
    if not isinstance(arms, list) or not arms:
        raise _err(source, "`arms` must be a non-empty list; start with `- name: baseline`.")
    parsed_arms = []
    for i, arm in enumerate(arms):
        if isinstance(arm, str):
            arm = {"name": arm} if arm == "baseline" else {"name": arm, "recipe": arm}
        if not isinstance(arm, dict) or "name" not in arm:
            raise _err(source, f"arm #{i + 1} must be a mapping with `name` (and `recipe` unless baseline).")
        _unknown(source, f"arm {arm['name']!r}", arm, _ARM_KEYS)
        recipe = arm.get("recipe")
        if recipe is not None and not isinstance(recipe, str):
            raise _err(source, f"arm {arm['name']!r}: `recipe` must be a recipe name or YAML path.")
        if recipe is not None and base_dir is not None and recipe.endswith((".yaml", ".yml")):
            if not Path(recipe).is_absolute() and (base_dir / recipe).is_file():
                recipe = str(base_dir / recipe)
        name = str(arm["name"])
        parsed_arms.append({"name": name, "recipe": recipe, "setting": str(arm.get("setting", name))})
    if parsed_arms[0]["recipe"] is not None:
        raise _err(source, "the first arm must be the baseline (`- name: baseline`, no recipe).")
    names = [a["name"] for a in parsed_arms]
    if len(set(names)) != len(names):
        raise _err(source, f"arm names must be unique, got {names}.")
    benches = data["benchmarks"]
    if not isinstance(benches, list) or not benches:
        raise _err(source, "`benchmarks` must be a non-empty list of {name, type: pope|chair, ...}.")
    parsed: list[Benchmark] = []
    for i, b in enumerate(benches):
        if not isinstance(b, dict) or "type" not in b:
            raise _err(source, f"benchmark #{i + 1} must be a mapping with `type: pope` or `type: chair`.")
        kind = str(b["type"]).lower()
        if kind not in _BENCH_KEYS:
            raise _err(
                source,
                f"benchmark #{i + 1}: unknown type {b['type']!r}{did_you_mean(kind, _BENCH_KEYS)} (pope or chair).",
            )
        _unknown(source, f"benchmark #{i + 1} ({kind})", b, _BENCH_KEYS[kind])
        required = ("questions", "images") if kind == "pope" else ("images", "annotations")
        for key in required:
            if key not in b:
                raise _err(source, f"benchmark #{i + 1} ({kind}) needs `{key}` (a path; $VARS are expanded).")
        settings = {**_BENCH_DEFAULTS[kind], **{k: v for k, v in b.items() if k not in ("name", "type")}}
        if "{question}" not in settings["prompt"] and kind == "pope":
            raise _err(source, f"benchmark #{i + 1}: the POPE `prompt` must contain {{question}}.")
        if "<image>" not in settings["prompt"]:
            raise _err(source, f"benchmark #{i + 1}: `prompt` must contain the <image> placeholder.")
        for key in ("max_new_tokens", "batch_size", "limit", "n_images"):
            v = settings.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise _err(source, f"benchmark #{i + 1}: `{key}` must be a positive integer.")
        if kind == "chair":
            seeds = settings["seeds"]
            if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
                raise _err(source, f"benchmark #{i + 1}: `seeds` must be a non-empty list of integers.")
        parsed.append(Benchmark(str(b.get("name") or kind.upper()), kind, settings))
    bnames = [b.name for b in parsed]
    if len(set(bnames)) != len(bnames):
        raise _err(source, f"benchmark names must be unique, got {bnames}.")
    files = data.get("published") or []
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _err(
            source, "`published` must be a list of YAML files with published rows (evals/published/*.yaml)."
        )
    rows: list[dict[str, Any]] = []
    for f in files:
        path = Path(f)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise _err(source, f"published file {path} does not exist.")
        import yaml

        loaded = yaml.safe_load(path.read_text()) or []
        if not isinstance(loaded, list) or not all(
            isinstance(r, dict) and {"benchmark", "setting", "metric", "value"} <= set(r) for r in loaded
        ):
            raise _err(
                source,
                f"published file {path} must be a list of rows with benchmark, setting, metric, value.",
            )
        rows.extend(loaded)
    batch_size = data.get("batch_size", 8)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise _err(source, "`batch_size` must be a positive integer.")
    return VLMTable(
        name=str(data["name"]),
        model=data["model"],
        arms=parsed_arms,
        benchmarks=parsed,
        dtype=str(data.get("dtype", "float16")),
        batch_size=batch_size,
        published=rows,
        published_files=[str(f) for f in files],
        published_model=data.get("published_model"),
        description=str(data.get("description", "")),
        requires=str(data.get("requires", "")),
        notes=str(data.get("notes", "")),
    )


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _err(str(path), f"is not valid YAML: {e}") from None


def is_vlm_table(path: str | Path) -> bool:
    """Whether ``path`` is a table definition with ``kind: vlm`` (False for a missing or non-YAML file)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = _read_yaml(path)
    except VLMEvalError:
        return False
    return isinstance(data, dict) and data.get("kind") == "vlm"


def load_vlm_table(path: str | Path) -> VLMTable:
    path = Path(path)
    if not path.is_file():
        raise VLMEvalError(f"VLM table file {path} does not exist (shipped ones are in evals/vlm/).")
    table = parse_vlm_table(_read_yaml(path), str(path), path.parent)
    table.path = path
    return table


# ============================================================================================ data
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _expand(value: str, what: str, fix: str) -> Path:
    """``value`` with ``$VARS`` expanded; an unset variable is an error that names the fix."""
    for m in _VAR.finditer(value):
        var = m.group(1) or m.group(2)
        if not os.environ.get(var):
            raise VLMEvalError(f"{what}: ${var} is not set (path {value!r}). To fix: {fix}.")
    return Path(os.path.expanduser(os.path.expandvars(value)))


def pope_docs(bench: Benchmark, limit: int | None = None) -> list[dict[str, Any]]:
    """The POPE questions of ``bench`` (the first ``limit``), with image paths and prompts; checks the data."""
    s = bench.settings
    qpath = _expand(str(s["questions"]), f"{bench.name} questions", POPE_HELP)
    images = _expand(str(s["images"]), f"{bench.name} images", COCO_HELP)
    if not qpath.is_file():
        raise VLMEvalError(f"POPE data not found at {qpath}: {POPE_HELP}.")
    if not images.is_dir():
        raise VLMEvalError(f"{bench.name}: COCO images folder {images} does not exist. To fix: {COCO_HELP}.")
    docs = []
    for i, line in enumerate(qpath.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            label = str(q["label"]).strip().lower()
            doc = {"id": str(q["question_id"]), "image": images / q["image"], "question": q["text"]}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VLMEvalError(
                f"{qpath} line {i + 1} is not an official POPE record "
                f'{{"question_id", "image", "text", "label"}}: {e!r}'
            ) from None
        if label not in ("yes", "no"):
            raise VLMEvalError(f"{qpath} line {i + 1}: label must be yes or no, got {q['label']!r}.")
        doc.update(label=label, prompt=s["prompt"].replace("{question}", doc["question"]))
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise VLMEvalError(f"{qpath} has no questions.")
    missing = [d["image"] for d in docs if not d["image"].is_file()]
    if missing:
        raise VLMEvalError(
            f"{bench.name}: {len(missing)} of {len(docs)} images are missing, e.g. {missing[0]}. To fix: {COCO_HELP}."
        )
    return docs


def chair_docs(
    bench: Benchmark, limit: int | None = None
) -> tuple[list[dict[str, Any]], dict[int, set[str]]]:
    """``n_images`` random val2014 images per seed (docs ``"<seed>:<image_id>"``) and their ground truth."""
    s = bench.settings
    ann = _expand(str(s["annotations"]), f"{bench.name} annotations", COCO_HELP)
    images = _expand(str(s["images"]), f"{bench.name} images", COCO_HELP)
    inst = ann / "instances_val2014.json"
    if not inst.is_file():
        raise VLMEvalError(f"CHAIR data not found: {inst} does not exist. To fix: {COCO_HELP}.")
    if not images.is_dir():
        raise VLMEvalError(f"{bench.name}: COCO images folder {images} does not exist. To fix: {COCO_HELP}.")
    meta = json.loads(inst.read_text())["images"]
    files = {int(im["id"]): im["file_name"] for im in meta}
    ids = sorted(files)
    n = min(s["n_images"], len(ids), limit or s["n_images"])
    docs = []
    for seed in s["seeds"]:
        for imid in random.Random(seed).sample(ids, n):
            docs.append(
                {
                    "id": f"{seed}:{imid}",
                    "group": seed,
                    "image_id": imid,
                    "image": images / files[imid],
                    "prompt": s["prompt"],
                }
            )
    missing = [d["image"] for d in docs if not d["image"].is_file()]
    if missing:
        raise VLMEvalError(
            f"{bench.name}: {len(missing)} of {len(docs)} images are missing, e.g. {missing[0]}. To fix: {COCO_HELP}."
        )
    gt = load_coco_objects(ann, sorted({d["image_id"] for d in docs}), use_captions=s["use_captions"])
    return docs, gt


def score(
    bench: Benchmark, docs: Sequence[dict[str, Any]], texts: dict[str, str], gt: Any = None
) -> dict[str, dict]:
    """Per-document records (what the metrics aggregate) from generated ``texts``."""
    out = {}
    for d in docs:
        text = texts[d["id"]]
        if bench.type == "pope":
            pred = pope_parse(text)
            out[d["id"]] = {
                "label": int(d["label"] == "yes"),
                "pred": int(pred == "yes"),
                "correct": int(pred == d["label"]),
                "answered": int(pope_answered(text)),
            }
        else:
            out[d["id"]] = {"group": d["group"], **chair_record(text, gt[d["image_id"]])}
    return out


# ======================================================================================== running
def _device(model: Any) -> Any:
    return next(model.parameters()).device


def generate_texts(
    loaded: tuple[Any, Any],
    items: Sequence[tuple[str, Path]],
    max_new_tokens: int,
    batch_size: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``(prompt, image path)`` pairs, batched with left padding."""
    import torch
    from PIL import Image

    model, processor = loaded
    tok = getattr(processor, "tokenizer", processor)
    side = getattr(tok, "padding_side", None)
    tok.padding_side = "left"
    device, dtype = _device(model), next(model.parameters()).dtype
    out: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = []
            for _, path in chunk:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            inputs = processor(
                images=images, text=[p for p, _ in chunk], return_tensors="pt", padding=len(chunk) > 1
            )
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            new = gen[:, inputs["input_ids"].shape[1] :]
            out.extend(t.strip() for t in processor.batch_decode(new, skip_special_tokens=True))
            if on_batch:
                on_batch(len(out), len(items))
    finally:
        if side is not None:
            tok.padding_side = side
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from . import __version__

    return {"attnsurgery": __version__, "transformers": version("transformers"), "torch": version("torch")}


def _fingerprint(
    table: VLMTable, arm: Arm, bench: Benchmark, docs: Sequence[dict[str, Any]], batch: int
) -> str:
    doc_key = hashlib.sha256(
        json.dumps([[d["id"], Path(d["image"]).name, d["prompt"]] for d in docs]).encode()
    ).hexdigest()
    key = {
        "format": CACHE_FORMAT,
        "model": table.model,
        "dtype": table.dtype,
        "arm": arm.fingerprint(),
        "benchmark": bench.type,
        "max_new_tokens": bench.settings["max_new_tokens"],
        "batch_size": batch,  # padding can move fp16 logits in the last digits
        "docs": doc_key,
        **_versions(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_vlm(model: str, dtype: str = "float16") -> tuple[Any, Any]:
    """``(model, processor)`` of an image-text-to-text model (hub id, local folder or attnsurgery alias)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .models import _ALIASES

    target = _ALIASES[model.lower()].target if model.lower() in _ALIASES else model
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise VLMEvalError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}.")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    try:
        processor = AutoProcessor.from_pretrained(target)
        vlm = AutoModelForImageTextToText.from_pretrained(target, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(
            f"cannot load {target!r} ({e}). Download the weights first (`huggingface-cli download {target}`) or "
            "point `model:` at a local folder."
        ) from None
    return vlm.eval(), processor


def _run_one(
    loaded: tuple[Any, Any],
    arm: Arm,
    bench: Benchmark,
    docs: Sequence[dict[str, Any]],
    batch: int,
    on_batch: Any,
) -> tuple[dict[str, str], float]:
    from .api import patch

    handle = patch(loaded[0], arm.recipe) if arm.recipe is not None else None
    try:
        # CHAIR seeds can draw the same image twice: greedy decoding gives it the same caption, generate once
        unique: dict[tuple[str, str], list[str]] = {}
        for d in docs:
            unique.setdefault((d["prompt"], str(d["image"])), []).append(d["id"])
        start = time.perf_counter()
        texts = generate_texts(
            loaded, [(p, Path(i)) for p, i in unique], bench.settings["max_new_tokens"], batch, on_batch
        )
        seconds = time.perf_counter() - start
    finally:
        if handle is not None:
            handle.remove()
    return {doc_id: t for ids, t in zip(unique.values(), texts) for doc_id in ids}, seconds


def _problems(bench: Benchmark, texts: dict[str, str], records: dict[str, dict]) -> list[str]:
    n = len(records)
    if bench.type == "pope":
        unanswered = sum(1 - r["answered"] for r in records.values())
        if unanswered > n / 2:
            return [
                f"{bench.name}: {unanswered}/{n} answers say neither yes nor no (the official parsing counts them as yes)"
            ]
        return []
    empty = sum(1 for t in texts.values() if not t.strip())
    return [f"{bench.name}: {empty}/{len(texts)} captions are empty"] if empty > len(texts) / 2 else []


def evaluate_vlm(
    table: VLMTable | str | Path,
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    force: bool = False,
    loaded: tuple[Any, Any] | None = None,
    on_arm: Callable[[str, str, str], None] | None = None,
) -> dict[str, Any]:
    """Run a VLM table and return its report (``table.json``'s content); see :func:`run_vlm_table`."""
    if not isinstance(table, VLMTable):
        table = load_vlm_table(table)
    arms = table.resolve_arms()  # every recipe resolves before any data or model is touched
    out_dir = Path(out_dir) if out_dir else Path("evals") / "results" / _slug(table.name)
    cache = out_dir / "cache"
    prepared = []  # (bench, docs, gt): all data checked before the model loads
    for bench in table.benchmarks:
        if bench.type == "pope":
            prepared.append((bench, pope_docs(bench, limit or bench.settings.get("limit")), None))
        else:
            docs, gt = chair_docs(bench, limit or bench.settings.get("limit"))
            prepared.append((bench, docs, gt))
    results: dict[str, dict[str, Any]] = {a.name: {} for a in arms}
    for arm in arms:
        for bench, docs, gt in prepared:
            batch = bench.settings.get("batch_size") or table.batch_size
            fp = _fingerprint(table, arm, bench, docs, batch)
            path = cache / f"{_slug(arm.name)}-{_slug(bench.name)}-{fp}.json"
            if path.is_file() and not force:
                entry = json.loads(path.read_text())
                status = "cached"
            else:
                if loaded is None:
                    loaded = load_vlm(table.model, table.dtype)
                if on_arm:
                    on_arm(arm.name, bench.name, "running")
                texts, seconds = _run_one(loaded, arm, bench, docs, batch, None)
                entry = {
                    "arm": arm.name,
                    "benchmark": bench.name,
                    "fingerprint": fp,
                    "seconds": seconds,
                    "texts": texts,
                }
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(entry))
                os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written entry
                status = "done"
            records = score(bench, docs, entry["texts"], gt)  # scoring is cheap: always from the texts
            results[arm.name][bench.name] = {
                "records": records,
                "texts": entry["texts"],
                "seconds": entry["seconds"],
                "fingerprint": entry["fingerprint"],
                "problems": _problems(bench, entry["texts"], records),
            }
            if on_arm:
                on_arm(arm.name, bench.name, status)
    return _report(table, arms, prepared, results, limit)


def _report(
    table: VLMTable, arms: list[Arm], prepared: list, results: dict, limit: int | None
) -> dict[str, Any]:
    import numpy as np

    base = arms[0].name
    rows: list[dict[str, Any]] = []
    pope_rows: dict[str, list[dict[str, Any]]] = {}
    for bench, docs, _ in prepared:
        summaries = {
            a.name: summarize(bench.type, list(results[a.name][bench.name]["records"].values())) for a in arms
        }
        deltas = {
            a.name: paired_bootstrap(
                bench.type, results[base][bench.name]["records"], results[a.name][bench.name]["records"]
            )
            for a in arms[1:]
        }
        for metric in POPE_METRICS if bench.type == "pope" else CHAIR_METRICS:
            row = {"benchmark": bench.name, "type": bench.type, "metric": metric, "n": len(docs), "arms": {}}
            for a in arms:
                entry = dict(summaries[a.name][metric])
                if a.name != base:
                    entry.update(deltas[a.name].get(metric, {}))
                entry["valid"] = not results[a.name][bench.name]["problems"]
                row["arms"][a.name] = entry
            rows.append(row)
            if bench.type == "pope":
                pope_rows.setdefault(metric, []).append(row)
    if len(pope_rows.get("F1", [])) > 1:  # the papers report POPE as the mean over its splits
        for metric, split_rows in pope_rows.items():
            k = len(split_rows)
            row = {
                "benchmark": "POPE",
                "type": "pope-mean",
                "metric": metric,
                "n": sum(r["n"] for r in split_rows),
            }
            row["arms"] = {}
            for a in arms:
                es = [r["arms"][a.name] for r in split_rows]
                entry: dict[str, Any] = {
                    "value": float(np.mean([e["value"] for e in es])),
                    "stderr": _combine([e.get("stderr") for e in es], k),
                    "valid": all(e["valid"] for e in es),
                }
                if a.name != base and all(e.get("delta") is not None for e in es):
                    se = _combine([e.get("delta_stderr") for e in es], k)
                    delta = float(np.mean([e["delta"] for e in es]))
                    p = 1.0 if not se else math.erfc(abs(delta / se) / math.sqrt(2))
                    entry.update(delta=delta, delta_stderr=se, p=p, n=row["n"])
                row["arms"][a.name] = entry
            rows.append(row)
    published = _match_published(table, rows)
    return {
        "name": table.name,
        "model": table.model,
        "description": table.description,
        "settings": {
            "dtype": table.dtype,
            "limit": limit,
            "benchmarks": {b.name: {"type": b.type, **b.settings} for b in table.benchmarks},
            "arms": table.arms,
            "bootstrap_iters": BOOTSTRAP_ITERS,
        },
        "table": rows,
        "published": published,
        "arms": {
            a.name: {
                "recipe": None if a.recipe is None else a.recipe.name,
                "benchmarks": {
                    b: {k: v for k, v in r.items() if k not in ("records", "texts")}
                    for b, r in results[a.name].items()
                },
            }
            for a in arms
        },
        "versions": _versions(),
    }


def _combine(stderrs: list[float | None], k: int) -> float | None:
    if any(s is None for s in stderrs):
        return None
    return math.sqrt(sum(s * s for s in stderrs)) / k  # independent splits


def _match_published(table: VLMTable, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Published rows for this model whose (benchmark, setting, metric) is one of ours, tagged with the arm."""
    settings = {a["setting"]: a["name"] for a in table.arms}
    want = table.published_model
    keys = {(r["benchmark"], r["metric"]) for r in rows}
    out = []
    for p in table.published:
        if want is not None and p.get("model") != want:
            continue
        if (p["benchmark"], p["metric"]) in keys and p["setting"] in settings:
            out.append({**p, "arm": settings[p["setting"]]})
    return out


# ====================================================================================== rendering
def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def render_vlm_markdown(report: dict[str, Any]) -> str:
    arm_names = list(report["arms"])
    pub = report["published"]
    header = ["benchmark", "metric", *arm_names, *[f"Δ {n}" for n in arm_names[1:]], "published"]
    out = [f"### {report['name']}: {report['model']}\n"]
    if report.get("description"):
        out.append(report["description"].strip() + "\n")
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for row in report["table"]:
        cells = [row["benchmark"], row["metric"] + (" ↓" if row["metric"] in LOWER_IS_BETTER else "")]
        for name in arm_names:
            e = row["arms"][name]
            cell = _num(e["value"]) + (f" ± {_num(e['stderr'])}" if e.get("stderr") is not None else "")
            if e.get("seed_std") is not None:
                cell += f" (seed std {_num(e['seed_std'])})"
            cells.append(cell if e["valid"] else f"**INVALID** ({cell})")
        for name in arm_names[1:]:
            e = row["arms"][name]
            if e.get("delta") is None:
                cells.append("–")
                continue
            se = f" ± {_num(e['delta_stderr'])}" if e.get("delta_stderr") is not None else ""
            cells.append(f"{e['delta']:+.2f}{se} ({_p_label(e['p'])})")
        hits = [
            f"{p['arm']}: {p['value']}" + (f" ± {p['std']}" if p.get("std") is not None else "")
            for p in pub
            if p["benchmark"] == row["benchmark"] and p["metric"] == row["metric"]
        ]
        cells.append("; ".join(hits) or "–")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    n = {r["benchmark"]: r["n"] for r in report["table"]}
    out.append(f"documents per benchmark: {n}.")
    secs = "; ".join(
        f"{a}: " + ", ".join(f"{b} {v['seconds']:.0f} s" for b, v in info["benchmarks"].items())
        for a, info in report["arms"].items()
    )
    out.append(f"generation time: {secs}.")
    out.append(
        "Values in percent (length: words per caption), ± bootstrap stderr over documents; Δ is paired "
        "(same documents, same bootstrap resamples); POPE = mean of its splits."
    )
    for a, info in report["arms"].items():
        problems = [p for b in info["benchmarks"].values() for p in b["problems"]]
        if problems:
            out.append(f"\n**{a} is INVALID** on: " + "; ".join(problems))
    sources = sorted({str(p.get("source", "")) for p in pub} - {""})
    if sources:
        out.append("\nPublished: " + " | ".join(sources))
    out.append("")
    return "\n".join(out)


def plot_vlm(report: dict[str, Any], out: str | Path) -> Path:
    """One panel per (benchmark, primary metric): a bar per arm with stderr, published values as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        r for r in report["table"] if r["metric"] in _PRIMARY["chair" if r["type"] == "chair" else "pope"]
    ]
    if not panels:
        raise VLMEvalError("nothing to plot: the report has no rows.")
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(report["arms"])
    for ax, row in zip(axes.flat, panels):
        vals = [row["arms"][n]["value"] for n in names]
        errs = [row["arms"][n].get("stderr") or 0.0 for n in names]
        bars = ax.bar(range(len(names)), vals, yerr=errs, capsize=3, color=colors[: len(names)])
        for bar, n in zip(bars, names):
            if not row["arms"][n]["valid"]:
                bar.set_hatch("//")
                bar.set_alpha(0.4)
        for p in report["published"]:
            if p["benchmark"] == row["benchmark"] and p["metric"] == row["metric"] and p["arm"] in names:
                i = names.index(p["arm"])
                ax.plot([i - 0.4, i + 0.4], [p["value"]] * 2, color="black", lw=2)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        arrow = "↓" if row["metric"] in LOWER_IS_BETTER else "↑"
        ax.set_title(row["benchmark"], fontsize=9)
        ax.set_ylabel(f"{row['metric']} {arrow}", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{report['model']} (black: published)", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_vlm_report(report: dict[str, Any], out_dir: str | Path, name: str = "table") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["md"].write_text(render_vlm_markdown(report))
    plot_vlm(report, paths["png"])
    return paths


def run_vlm_table(
    path: str | Path,
    *,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    force: bool = False,
    loaded: tuple[Any, Any] | None = None,
    on_arm: Callable[[str, str, str], None] | None = None,
) -> dict[str, Path]:
    """Run a ``kind: vlm`` table; write ``table.json``, ``table.md`` and ``table.png`` to ``out_dir``
    (default ``evals/results/<name>``) and return their paths (keys ``json``, ``md``, ``png``).

    Every recipe resolves and every data file is checked before the model loads. ``limit`` caps the POPE
    questions per split and the CHAIR images per seed. Each (arm, benchmark) generation run is cached under
    ``out_dir/cache`` by a fingerprint (model, dtype, recipe content, documents, prompt, max_new_tokens, batch
    size, versions); ``force`` reruns. ``loaded`` passes an already loaded ``(model, processor)``.
    ``on_arm(arm, benchmark, status)`` reports progress ("running", "done", "cached").
    """
    table = load_vlm_table(path) if not isinstance(path, VLMTable) else path
    report = evaluate_vlm(table, out_dir=out_dir, limit=limit, force=force, loaded=loaded, on_arm=on_arm)
    out_dir = Path(out_dir) if out_dir else Path("evals") / "results" / _slug(table.name)
    return write_vlm_report(report, out_dir)
