"""A transformers cache layer holding Hedgehog's constant-size decode state.

transformers updates a layer's KV cache inside the attention module, *before* the attention function runs, and
keeps every key in a ``DynamicLayer``. For a hedgehog layer that would make memory grow with the generated
length for nothing: only the last ``window - 1`` keys/values are ever read again, older ones live in the
recurrent state ``S = sum phi(k) v^T``, ``z = sum phi(k)``. So the surgery swaps each targeted layer's empty
``DynamicLayer`` for a :class:`HedgehogCacheLayer` (a forward pre-hook on the attention module, which runs before
the update) and, after computing the attention, folds the keys that left the window into the state and drops
them (:meth:`HedgehogCacheLayer.commit`). Memory per layer is then ``(window - 1)`` keys and values plus
``S`` (H x 2F x D) and ``z`` (H x 2F), whatever the length.

Because the state lives in the cache object, transformers' own cache lifecycle carries it: beam search's
``reorder_cache``, ``batch_select_indices`` / ``batch_repeat_interleave``, ``reset``. Cropping (assisted
decoding) can only take back tokens not yet folded: the layer is croppable while ``activate_past_recording`` is
on (then nothing is folded), as transformers' own linear-attention layers; otherwise ``crop`` refuses, and
``generate`` refuses assisted decoding with its usual message. The mask transformers builds for the layer still
spans the whole request (``get_mask_sizes`` reports the full length, as a ``DynamicLayer`` would); the hedgehog
kernel reads only its last columns.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class HedgehogCacheLayer(DynamicLayer):
    """Last keys/values of the softmax window plus the linear state ``(S, z)`` of everything older."""

    is_sliding = (
        False  # full-attention semantics: transformers builds the same (full) mask as for a DynamicLayer
    )

    def __init__(self, owner: Any, window: int | None) -> None:
        super().__init__()
        self.owner = owner  # id() of the surgery that fills it: another patch must not read this state
        self.window = window
        self.cumulative_length = 0
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.folded_tokens = 0  # tokens that left the window into the state (they cannot be cropped back)
        self.record_past = False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states[:, :, :0]
            self.values = value_states[:, :, :0]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        return self.keys, self.values

    def commit(self, state: tuple[torch.Tensor, torch.Tensor], folded: int) -> None:
        """After the kernel: ``state`` now covers the first ``folded`` kept columns; drop them."""
        self.state = (state[0].detach(), state[1].detach())
        self.folded_tokens += folded
        if folded:
            self.keys = self.keys[:, :, folded:]
            self.values = self.values[:, :, folded:]

    @property
    def kept(self) -> int:
        return 0 if self.keys is None or self.keys.dim() < 3 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # transformers >= 5.x passes the query length; 5.0 passed cache_position (one entry per query token)
        query_length = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held: kept keys/values plus the state (what stays flat while generating)."""
        tensors = [t for t in (self.keys, self.values) if isinstance(t, torch.Tensor)]
        tensors += list(self.state or ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _rows(self, fn: Any) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.state is not None:
            self.state = (fn(self.state[0]), fn(self.state[1]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        super().reset()  # drops keys/values
        self.cumulative_length = 0  # (transformers 5.0's DynamicLayer.reset does not know it)
        self.state = None
        self.folded_tokens = 0

    def activate_past_recording(self) -> None:
        self.record_past = True

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return self.record_past or self.folded_tokens == 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(
                "hedgehog cache: crop takes a negative number of tokens to remove (transformers' convention)."
            )
        n = -tokens_to_remove
        if n == 0:
            return
        if not self.is_croppable or n > self.kept:
            raise RuntimeError(
                f"hedgehog cache: cannot take back {n} tokens; tokens that left the softmax window were folded into "
                "the linear state, which cannot be undone (call activate_past_recording() before the forward to keep "
                "them)."
            )
        self.keys = self.keys[:, :, :-n]
        self.values = self.values[:, :, :-n]
        self.cumulative_length -= n
