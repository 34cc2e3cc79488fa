"""The per-request side channel: which query and key positions of a forward are real tokens under padding and a
KV cache (:class:`RequestState`), filled by a forward pre-hook on the decoder so it survives ``generate()``, which
rejects unknown forward keyword arguments."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def key_valid_from_mask(
    mask: Any, batch: int, q_len: int, past: int = 0, prev: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(B, past + q_len) bool: which key columns of the request are real tokens, from the decoder's mask.

    A 2D mask says it directly. A 4D mask (generate with a static cache, or a caller's own; bool: True = attend,
    additive float: 0 = attend; (B|1, H|1, Q|1, K)) says it per query: a key is real for a row when some query of
    that row may attend to it, since padding is masked for every query while each real token sees at least itself.
    A static cache's mask runs to ``max_cache_len``: the slots after the tokens seen so far are dropped. A
    sliding-window mask hides old keys from the new queries without making them padding, so at a decode step
    the cached columns keep the validity ``prev`` found when they were queries. A dict of masks (one per layer
    type) is read through its full-attention mask. None when the mask says nothing about padding (no mask), or
    its columns cannot be placed (a sliding cache shorter than the request, with no earlier validity).
    """
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3, 4):
        return None
    if mask.dim() == 2:
        return mask.bool()
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if allowed.dim() == 3:  # (B, Q, K)
        allowed = allowed[:, None]
    k_len, total = allowed.shape[-1], past + q_len
    start = min(past, k_len - q_len)  # the mask column of the first new query
    if allowed.shape[-2] == q_len and start >= 0:
        # torch < 2.5 with transformers 5.0 un-masks rows that see nothing (left padding) so SDPA gives no NaN:
        # such a row sees every key, later ones included, which no causal row does; it must not vouch for keys
        future = torch.arange(k_len, device=allowed.device)[None, :] > (
            torch.arange(q_len, device=allowed.device)[:, None] + start
        )
        unmasked = allowed.all(-1) & future.any(-1)
        allowed = allowed & ~unmasked[..., None]
    seen = allowed.any(-2).any(-2)  # (B|1, K)
    seen = seen.expand(batch, -1) if seen.shape[0] == 1 else seen
    have_prev = prev is not None and prev.shape[0] == batch and prev.shape[1] >= past and past > 0
    if k_len >= total:  # key columns are the request's columns (a static cache has empty slots after them)
        valid = seen[:, :total].clone()
        if have_prev:
            valid[:, :past] = prev[:, :past].to(valid.device)
        return valid
    if not have_prev or start < 0:  # a sliding cache shorter than the request: only its last columns are here
        return None
    return torch.cat([prev[:, :past].to(seen.device), seen[:, start : start + q_len]], dim=1)


def _past_length(kwargs: dict) -> int:
    """How many tokens of the request the cache holds before this call's."""
    position = kwargs.get("cache_position")
    if isinstance(position, torch.Tensor) and position.dim() == 1 and position.numel() > 0:
        # exact where given (transformers 5.0 passes it): a static cache's get_seq_length there counts the filled
        # slots of row 0, which lags behind under left padding
        return int(position[0])
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


class RequestState:
    """What one forward call carries that attention functions never see: real-token positions.

    Filled by a forward pre-hook on the decoder from its ``attention_mask`` (2D, covering cached and new
    tokens, or 4D: :func:`key_valid_from_mask`), ``position_ids`` or cache length. Surgeries may stash their own
    per-request data in ``extras`` (e.g. sink sets frozen at prefill) under keys ``(name, id(surgery), ...)``,
    tensors per batch row along dim 0; it is cleared when a new prompt starts (no cache, or an empty one), and a
    surgery's slots go with it when it is removed.

    On a vision-language model a second pre-hook, on the top-level model (the only place that still sees
    ``input_ids``: the language model gets merged embeddings), marks image and video placeholders; ``image_mask``
    then covers every key column of the request, prompt and generated tokens alike, through cached decoding.
    """

    def __init__(self, visual_token_ids: tuple[int, ...] = ()) -> None:
        self._positions: torch.Tensor | None = None
        self.key_valid: torch.Tensor | None = None  # (B, Tk_total) bool real keys (key_valid_from_mask)
        self.past_len: int = 0
        self.extras: dict[str, Any] = {}
        self.visual_token_ids = tuple(visual_token_ids)  # image and video placeholders: visual tokens
        #: (B, Tk_total) bool: which key columns hold image or video tokens (VLMs only; None when unknown)
        self.image_mask: torch.Tensor | None = None
        # (B, Tq) this call's image tokens, from the top-level hook, consumed by the decoder hook
        self._pending_image: torch.Tensor | None = None

    def capture_images(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Top-level pre-hook of a VLM: which of this call's tokens are image placeholders."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and self.visual_token_ids:
            self._pending_image = torch.isin(ids, torch.tensor(self.visual_token_ids, device=ids.device))
        else:  # inputs_embeds only: image positions are unknown
            self._pending_image = None

    def _update_images(self, batch: int, q_len: int, past: int) -> None:
        chunk, self._pending_image = self._pending_image, None
        if chunk is not None and tuple(chunk.shape) != (batch, q_len):
            chunk = None  # not the call this chunk was recorded for
        if past == 0:
            self.image_mask = chunk
            return
        prev = self.image_mask
        if prev is None or prev.shape[0] != batch:
            self.image_mask = None
            return
        if chunk is None:  # decode steps feed generated tokens: they are text
            chunk = torch.zeros(batch, q_len, dtype=torch.bool, device=prev.device)
        if prev.shape[1] >= past:  # a cache cropped back (assisted decoding) drops the tail
            prev = prev[:, :past]
        else:
            prev = torch.nn.functional.pad(prev, (0, past - prev.shape[1]))
        self.image_mask = torch.cat([prev, chunk.to(prev.device)], dim=1)

    def drop(self, owner: Any) -> None:
        """Forget a removed surgery's slots: ``extras`` keys are ``(name, id(surgery), ...)``, and a surgery made
        later may get the same id."""
        gone = id(owner)
        self.extras = {
            k: v for k, v in self.extras.items() if not (isinstance(k, tuple) and len(k) > 1 and k[1] == gone)
        }

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search gave each cache row a new parent: per-row state follows it, as the KV cache does.

        ``extras`` tensors are per batch row along dim 0 (a convention of surgeries' slots); state derived from
        generated tokens (VAR's ``decode="detect"`` sinks) differs between beams and would otherwise stay on the
        row it was found in, while the cache moves on."""
        rows = beam_idx.shape[0]

        def pick(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows:
                return x.index_select(0, beam_idx.to(x.device))
            return x

        self.key_valid, self.image_mask = pick(self.key_valid), pick(self.image_mask)
        self.extras = {k: pick(v) for k, v in self.extras.items()}

    def save(self) -> dict[str, Any]:
        """Everything a nested forward would overwrite (see :meth:`Engine.side_forward`)."""
        return dict(vars(self))

    def restore(self, saved: dict[str, Any]) -> None:
        vars(self).clear()
        vars(self).update(saved)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            self._positions = None
            return
        batch, q_len = ref.shape[0], ref.shape[1]
        past = _past_length(kwargs)
        if past == 0:
            self.extras = {}  # a new prompt: forget state frozen for the previous one
        self.past_len = past
        self._update_images(batch, q_len, past)
        mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        prev = self.key_valid if past > 0 else None
        self.key_valid = key_valid_from_mask(mask, batch, q_len, past, prev)
        if self.key_valid is not None:
            # index among real tokens: right padding (lm-eval scoring) and left padding (generate) alike
            self._positions = (self.key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2:
            self._positions = position_ids.expand(batch, -1)
        else:
            self._positions = (torch.arange(q_len, device=ref.device) + past).expand(batch, q_len)

    def query_valid(self, q_len: int, k_len: int) -> torch.Tensor:
        valid = self.key_valid
        if (
            valid is None
            or valid.shape[1] < q_len
            or (self._positions is not None and self._positions.shape[1] != q_len)
        ):
            return torch.ones(1, q_len, dtype=torch.bool)
        return valid[:, -q_len:]

    def query_positions(self, q_len: int, k_len: int) -> torch.Tensor:
        pos = self._positions
        if pos is None or pos.shape[1] != q_len:
            # Called without going through the decoder (stale state): the queries are the last q_len keys.
            return torch.arange(k_len - q_len, k_len).unsqueeze(0)
        return pos
