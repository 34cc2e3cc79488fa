from __future__ import annotations

import warnings
from typing import Any

import torch

from attnsurgery.errors import SurgeryConfigError, UnsupportedModelError
from attnsurgery.kernels import column_mask, sdpa_with_lse, softcapped, tiled_attention
from attnsurgery.surgery import AttentionCall, AttentionTile, Stage, Surgery

from .config import KNOWN_SINK_DIMS, VarConfig, lookup_sink_dims, near_sink_dims

#: bytes of fp32 (query x edited column) probabilities held at once by the fused correction
_BLOCK_BYTES = 64 * 2**20
#: calls with at most this many query rows (decode steps) compute their probabilities explicitly
_DIRECT_ROWS = 4


def _to_columns(mask: torch.Tensor | None, batch: int, key_len: int) -> torch.Tensor | None:
    """A (B, T) per-column mask of the request on this call's ``key_len`` key columns (a static cache has empty
    slots past the tokens seen so far: they are neither image nor sink)."""
    if mask is None or mask.shape[0] != batch:
        return None
    if mask.shape[1] >= key_len:
        return mask[:, :key_len]
    return torch.nn.functional.pad(mask, (0, key_len - mask.shape[1]))


def _weighted_values(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij v_j with query heads grouped by the kv head they share: (B, H, bq, M) x (B, Hkv, M, Dv)."""
    b, h, bq, m = weights.shape
    num_kv = values.shape[1]
    return (weights.reshape(b, num_kv, (h // num_kv) * bq, m) @ values).view(b, h, bq, -1)


class VarSurgery(Surgery):
    """VAR: take attention from sink tokens and give it to the image in image-centric heads.

    On each layer from 2 on (the last one skipped, as the paper says), sink tokens are the tokens whose layer
    input has a massive activation, ``max_{d in sink_dims} |x[d] / RMS(x)| >= tau`` (text sinks such as BOS and
    visual sinks among the image tokens), found at prefill from a pre-hook on the decoder layers. For every query
    after the image and every head where the image gets at least ``summ`` of the attention and the visual sinks
    hold at most ``rho`` of it, the sinks keep ``p`` of their attention and the removed ``(1 - p) sum_S a`` goes to
    the non-sink image tokens in proportion to their attention; rows still sum to 1. Paper: Kang et al., "See What
    You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025 (arXiv 2503.03321).

    Exact on a fused kernel: with the SDPA output ``o_i`` and its log-sum-exp, the edited output is
    ``o_i - (1 - p) u_S + (1 - p) P_S / P_V u_V`` where ``P_X = sum_{j in X} a_ij`` and ``u_X = sum_{j in X} a_ij v_j``
    over the sink set S and the non-sink image tokens V: the probabilities of the image span and sink columns only,
    for the queries after the image (O(text x image) extra work, no n x n matrix).

    Acts only on vision-language models (LLaVA, LLaVA-NeXT, Qwen2-VL ...): image positions come from ``input_ids``
    and the config's image token id, per batch row; video tokens (Qwen2-VL's ``video_token_id``) count as image
    tokens. A batch without image tokens is left unchanged (warning).

    >>> patch(model, "var", tau=20, rho=0.5, p=0.6, summ=0.2)          # LLaVA-1.5-7B: sink_dims known
    >>> patch(model, "var", sink_dims=[458, 2570])                       # another backbone
    """

    name = "var"
    config_class = VarConfig
    summary = "VAR visual attention redistribution: sink attention to image tokens in image-centric heads"
    paper = "Kang et al., See What You Are Told: Visual Attention Sink in LMMs, ICLR 2025 (arXiv 2503.03321)"
    stages = frozenset({Stage.PROBS})
    fused = True
    example_args = {"p": 0.3, "tau": 1.5, "summ": 0.05, "sink_dims": [0, 1]}
    identity_args = {"p": 1.0}
    #: needs image tokens: the shared text-model contract (tests/test_contract.py) skips it; tests/test_vlm.py
    #: covers the same invariants on tiny LLaVA and Qwen2-VL models
    requires_vision = True

    def setup(self, model: Any, engine: Any) -> None:
        info = engine.info
        if not info.is_vision_language:
            raise UnsupportedModelError(
                f"var acts on vision-language models (LLaVA, LLaVA-NeXT, Qwen2-VL ...): {type(model).__name__} has "
                "no image token id in its config (image_token_id / image_token_index), so image positions cannot "
                "be found. Load the full VLM (e.g. LlavaForConditionalGeneration), not its language model."
            )
        dims = self.config.sink_dims if self.config.sink_dims is not None else self._known_dims(model, info)
        bad = [d for d in dims if not 0 <= d < info.hidden_size]
        if bad:
            raise SurgeryConfigError(
                f"var: sink_dims {bad} are out of range; this model's hidden size is {info.hidden_size} "
                f"(channels 0..{info.hidden_size - 1}). Sink dimensions are backbone-specific: find them with "
                "`attnsurgery calibrate var`."
            )
        self._dims = list(dims)
        last = info.num_layers - (1 if self.config.skip_last_layer else 0)
        # layers 0 and 1 never get sinks in the reference (sink_select_layers = range(2, L))
        self._layers = frozenset(layer for layer in self.targets.layers if 2 <= layer < last)
        self._heads = {layer: self.targets.head_mask(layer) for layer in self._layers}
        engine.capture_layer_inputs(self, self._detect)

    @staticmethod
    def _known_dims(model: Any, info: Any) -> list[int]:
        """D_sink of a known backbone, matched on shape and vocabulary; a clear error for anything else."""
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type, vocab = getattr(text, "model_type", ""), getattr(text, "vocab_size", None)
        known = lookup_sink_dims(model_type, info.hidden_size, info.num_layers, vocab)
        if known is not None:
            return known[1]
        checkpoint = getattr(config, "_name_or_path", "") or "this model"
        backbone = f"{model_type or '?'}, hidden size {info.hidden_size}, {info.num_layers} layers, vocabulary {vocab}"
        fix = "Pass sink_dims=[...], found with `attnsurgery calibrate var` (patches.var.calibrate.find_sink_dims)."
        near = near_sink_dims(model_type, info.hidden_size, info.num_layers)
        if near is None:
            raise SurgeryConfigError(f"var: no known sink dimensions for {checkpoint} ({backbone}). {fix}")
        # same shape, other vocabulary: most likely another base LLM (Llama-3 under a LLaVA with Llama-2's shape),
        # whose massive activations sit in other channels; the known dims would silently edit the wrong tokens
        entry = KNOWN_SINK_DIMS[near]
        raise SurgeryConfigError(
            f"var: {checkpoint} ({backbone}) has the shape of {near} but not its vocabulary "
            f"({entry['vocab'][0]}..{entry['vocab'][1]}), so its language model is probably not {entry['base']}; "
            f"{near}'s sink dims {entry['dims']} are not used. {fix} If it is a {near} variant with a resized "
            f"vocabulary, pass sink_dims={entry['dims']}."
        )

    def active_stages(self, layer_idx: int) -> frozenset[Stage]:
        if layer_idx in self._layers and self.config.p != 1.0:
            return self.stages
        return frozenset()

    # -- sink detection on the layer inputs --------------------------------------------------------------------
    def _slot(self, layer_idx: int) -> tuple:
        return ("var", id(self), layer_idx)

    def _detect(self, layer_idx: int, hidden: torch.Tensor, request: Any) -> None:
        """Pre-hook on decoder layer ``layer_idx``: mark this call's tokens that are sinks at this layer."""
        if layer_idx not in self._layers or self.config.p == 1.0:
            return
        past = request.past_len
        if past == 0 or self.config.decode == "detect":
            x = hidden.float()
            rms = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
            new = (x[..., self._dims].abs() / rms).amax(-1) >= self.config.tau  # (B, Tq)
        else:  # frozen: generated tokens are never sinks
            new = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        slot = self._slot(layer_idx)
        prev = request.extras.get(slot)
        if past == 0 or prev is None or prev.shape[0] != new.shape[0]:
            prev = new.new_zeros(new.shape[0], past)
        request.extras[slot] = torch.cat([_to_columns(prev, new.shape[0], past), new], dim=1)

    # -- what one call needs -----------------------------------------------------------------------------------
    def _plan(self, call: AttentionCall) -> dict[str, torch.Tensor] | None:
        """Per-call key/query masks, or None when nothing on this call can be edited."""
        batch = call.query.shape[0]
        device = call.query.device
        request = call.request
        image = _to_columns(request.image_mask, batch, call.key_len)
        if image is None or not bool(image.any()):
            warnings.warn(
                "var: no image tokens in this batch (nor video tokens), so there is nothing to redistribute to; the model runs "
                "unchanged. Pass the processor's input_ids (with the image placeholders) and pixel values.",
                stacklevel=2,
            )
            return None
        sinks = _to_columns(request.extras.get(self._slot(call.layer_idx)), batch, call.key_len)
        if sinks is None:
            return None
        image, sinks = image.to(device), sinks.to(device)
        key_valid = _to_columns(request.key_valid, batch, call.key_len)
        if key_valid is not None:
            sinks = sinks & key_valid.to(device)  # padding is never a sink
        columns = torch.arange(call.key_len, device=device)
        last_image = torch.where(image, columns, -1).amax(-1)  # (B,)
        # the new queries follow the tokens already cached; a static cache is longer than that (its key columns
        # run to max_cache_len), a sliding-window cache shorter (then they are its last Tq columns)
        start = min(request.past_len, call.key_len - call.query_len)
        query_cols = columns[start : start + call.query_len]
        rows = query_cols[None, :] > last_image[:, None]  # (B, Tq): text after the row's image
        rows &= (image & sinks).any(-1, keepdim=True)  # a row without visual sinks is left alone (reference)
        rows &= call.query_valid.to(device).expand(batch, -1)
        if not bool(rows.any()):
            return None
        return {"image": image, "sinks": sinks, "rows": rows, "n_image": image.sum(-1).float()}

    def _select(
        self, p_vis: torch.Tensor, p_svis: torch.Tensor, p_rest: torch.Tensor, n_image: torch.Tensor
    ) -> torch.Tensor:
        """Image-centric (head, query) pairs: enough visual attention, not dominated by visual sinks."""
        portion = p_svis / (p_vis + 1e-6 * n_image)  # reference: sum_vis a / sum_vis (a + 1e-6)
        return (p_vis >= self.config.summ) & (portion <= self.config.rho) & (p_rest > 0)

    # -- the fused path ----------------------------------------------------------------------------------------
    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, call: AttentionCall
    ) -> torch.Tensor:
        if call.query_len <= _DIRECT_ROWS:
            # decode steps: the correction would read nearly every key anyway (the image span), so one explicit
            # probability row per head is cheaper than the fused kernel plus a gather of the image's keys
            return tiled_attention(query, key, value, call.attention_mask, scaling, call, prob_stages=[self])
        out, lse = sdpa_with_lse(
            query,
            key,
            value,
            call.attention_mask,
            scaling,
            call.is_causal,
            softcap=call.kwargs.get("softcap"),
        )
        plan = self._plan(call)
        if plan is not None:
            out = self._correct(out, lse, plan, call)
        return out.transpose(1, 2)  # (B, Tq, H, Dv)

    def _correct(
        self, out: torch.Tensor, lse: torch.Tensor, plan: dict[str, torch.Tensor], call: AttentionCall
    ) -> torch.Tensor:
        """out (B, H, Tq, Dv) -> edited, from the probabilities of the image and sink columns only."""
        image, sinks, rows = plan["image"], plan["sinks"], plan["rows"]
        bsz, num_heads, q_len, _ = out.shape
        num_kv = call.key.shape[1]
        groups = num_heads // num_kv
        q0 = int(rows.any(0).nonzero()[0])  # first query row any batch row edits
        # the columns that matter, per batch row, packed to the left: (B, M) indices and validity
        wanted = image | sinks
        most = int(wanted.sum(-1).max())
        idx = wanted.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[:, :most]
        chosen = wanted.gather(-1, idx)
        is_image = image.gather(-1, idx) & chosen
        is_sink = sinks.gather(-1, idx) & chosen
        k_s = call.key.gather(2, idx[:, None, :, None].expand(-1, num_kv, -1, call.key.shape[-1])).float()
        v_s = call.value.gather(2, idx[:, None, :, None].expand(-1, num_kv, -1, call.value.shape[-1])).float()
        softcap = call.kwargs.get("softcap")
        p, heads = self.config.p, self._heads[call.layer_idx].to(out.device)
        out = out.float().clone()
        step = max(1, _BLOCK_BYTES // max(1, 4 * bsz * num_heads * most))
        for s in range(q0, q_len, step):
            e = min(q_len, s + step)
            qb = call.query[:, :, s:e].float().reshape(bsz, num_kv, groups * (e - s), -1)
            # scored as the model scores them: softcapped (Gemma-2), plus an additive float mask's biases
            logits = ((qb * call.scaling) @ k_s.transpose(-1, -2)).view(bsz, num_heads, e - s, most)
            logits = softcapped(logits, softcap)
            ok, bias = column_mask(call.attention_mask, call.is_causal, q_len, idx[:, None, :], s, e)
            if bias is not None:
                logits = logits + bias
            ok = ok & chosen[:, None, None, :]  # (B, H|1, bq, M)
            probs = torch.exp((logits - lse[:, :, s:e, None]).masked_fill(~ok, float("-inf")))  # a_ij
            img, snk = is_image[:, None, None, :], is_sink[:, None, None, :]
            rest = img & ~snk
            p_vis = (probs * img).sum(-1)
            p_svis = (probs * (img & snk)).sum(-1)
            p_sink = (probs * snk).sum(-1)
            p_rest = (probs * rest).sum(-1)
            edit = self._select(p_vis, p_svis, p_rest, plan["n_image"][:, None, None])
            edit &= rows[:, None, s:e] & heads[None, :, None]
            if not bool(edit.any()):
                continue
            u_sink = _weighted_values(probs * snk, v_s)
            u_rest = _weighted_values(probs * rest, v_s)
            gain = (1.0 - p) * p_sink / p_rest.clamp(min=torch.finfo(torch.float32).tiny)
            edited = out[:, :, s:e] - (1.0 - p) * u_sink + gain[..., None] * u_rest
            out[:, :, s:e] = torch.where(edit[..., None], edited, out[:, :, s:e])
        return out.to(call.value.dtype)

    # -- the tiled path (composition with other probability-level surgeries, attention maps) -------------------
    def probs(self, probs: torch.Tensor, tile: AttentionTile) -> torch.Tensor:
        call = tile.call
        if "var" not in call.scratch:  # once per call, shared by its tiles
            call.scratch["var"] = self._plan(call)
        plan = call.scratch["var"]
        if plan is None:
            return probs
        rows = plan["rows"][:, None, tile.q_start : tile.q_end]  # (B, 1, bq)
        if not bool(rows.any()):
            return probs
        img = plan["image"][:, None, None, tile.k_start : tile.k_end]  # (B, 1, 1, bk)
        snk = plan["sinks"][:, None, None, tile.k_start : tile.k_end]
        rest = img & ~snk
        p_vis = (probs * img).sum(-1)
        p_svis = (probs * (img & snk)).sum(-1)
        p_sink = (probs * snk).sum(-1)
        p_rest = (probs * rest).sum(-1)
        edit = self._select(p_vis, p_svis, p_rest, plan["n_image"][:, None, None])
        edit &= rows & self._heads[call.layer_idx].to(probs.device)[None, :, None]
        p = self.config.p
        gain = 1.0 + (1.0 - p) * p_sink / p_rest.clamp(min=torch.finfo(torch.float32).tiny)
        edited = torch.where(snk, probs * p, torch.where(rest, probs * gain[..., None], probs))
        return torch.where(edit[..., None], edited, probs)
