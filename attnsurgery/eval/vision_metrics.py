"""POPE and CHAIR scoring: answers and captions -> per-document records -> metrics, with bootstrap statistics.

Kept close to the official scripts (see :mod:`attnsurgery.eval.vision`): :func:`pope_parse` reads a free-form
answer as the official POPE script does; :func:`caption_objects` / :func:`chair_record` find COCO object
mentions through CHAIR's synonym list. :func:`summarize` gives each metric's value and bootstrap stderr over
documents, :func:`paired_bootstrap` the paired delta of two arms on the same documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .text_results import EvalError

BOOTSTRAP_ITERS = 2000

POPE_METRICS = ("accuracy", "precision", "recall", "F1", "yes_ratio")
CHAIR_METRICS = ("CHAIR_S", "CHAIR_I", "recall", "length")
LOWER_IS_BETTER = {"CHAIR_S", "CHAIR_I"}

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
