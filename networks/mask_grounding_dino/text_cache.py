"""Text-encoder outputs computed once per distinct prompt (evaluation and inference).

Evaluation and inference usually prompt every image with the same class list, and every batch used to run the
same caption through BERT again.  :class:`TextCache` keeps the encoder's output per token row, keyed by the
row's token ids and everything else the output depends on; it is used only when the encoder cannot change and
is deterministic: no gradient is being recorded and the encoder is in eval mode (no dropout).  The key also holds
the version counters of the encoder's parameters, which every in-place update bumps (optimizer steps,
``load_state_dict``), so a validation pass after more training never reuses stale features.  At most
``max_entries`` rows are kept, least recently used first out.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from networks.common.lru import LRUDict

__all__ = ["TextCache"]


class TextCache:
    """LRU cache of per-row text-encoder outputs; ``hits``/``misses`` count rows served / computed."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = int(max_entries)
        self._rows = LRUDict(max_entries)
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._rows.clear()

    def reset_counts(self) -> tuple[int, int]:
        """``(hits, misses)`` since the last reset."""
        counts = (self.hits, self.misses)
        self.hits = self.misses = 0
        return counts

    @staticmethod
    def usable(encoder: nn.Module) -> bool:
        """True when the encoder's output for a row is a function of the row alone (see module doc)."""
        return not encoder.training and not torch.is_grad_enabled()

    def encode(self, encoder: nn.Module, run: Callable[[], torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        """The [B, L, H] encoder output for the rows of ``input_ids`` [B, L]: from the cache when every row is
        there, else ``run()`` on the whole batch (so a batch's numbers never depend on what was cached) and its
        new rows are kept."""
        state = (tuple(p._version for p in encoder.parameters()), input_ids.shape[1], input_ids.device,
                 torch.is_autocast_enabled(input_ids.device.type))
        keys = [(state, tuple(row)) for row in input_ids.tolist()]
        missing: dict = {}
        for r, key in enumerate(keys):
            if key not in self._rows and key not in missing:
                missing[key] = r
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            out = run()
            for key, r in missing.items():
                self._rows.put(key, out[r].detach())
            return out
        return torch.stack([self._rows.get(key) for key in keys])
