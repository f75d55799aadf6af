"""How much distinct text a token-id calibration holds, counted from the ids alone.

Windows cut from a short text repeat it: 128 windows of 128 tokens cut from 1,560 tokens use every
token about ten times, and the held-out samples of ``damp="auto"`` are then copies of the fit
samples. :func:`coverage` counts the distinct ``k``-token sequences of the windows (``k`` =
:data:`SPAN`): a repeated stretch of text repeats its ``k``-grams, a fresh one does not. It works on
any ``(samples, seq_len)`` ids, however they were made (text cut here, a tokenizer's output, ids
from a file).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPAN = 16
"""Length of the token sequences compared: long enough that natural text rarely repeats one."""
REPEAT_WARNING = 2.0
"""Calibration whose text is repeated this many times or more gets a warning."""
FEW_IDS = 32
"""Calibration with fewer distinct token ids than this is degenerate."""
DOMINANT_SHARE = 0.5
"""Calibration in which one token id is this share of all tokens or more is degenerate."""
_HASH = 1_000_003


@dataclass(frozen=True)
class Coverage:
    """Counts of a calibration's ids.

    Attributes:
        tokens: all positions, ``samples * seq_len``.
        windows: samples.
        span: the ``k`` of the ``k``-grams compared.
        distinct_share: about what share of the tokens is distinct text (1.0: no text repeated):
            the distinct ``k``-grams, plus ``k - 1`` tokens for every stretch of text they cover,
            over all tokens.
        overlapping_windows: windows that share a ``k``-gram with another window.
        distinct_ids: distinct token ids; ``dominant_share``: the most frequent id's share.
    """

    tokens: int
    windows: int
    span: int
    distinct_share: float
    overlapping_windows: int
    distinct_ids: int
    dominant_share: float

    @property
    def distinct_tokens(self) -> int:
        """About how many tokens of distinct text the windows hold."""
        return int(round(self.tokens * self.distinct_share))

    @property
    def repeats(self) -> float:
        """How many times the text is used, on average."""
        return 1.0 / self.distinct_share if self.distinct_share > 0 else float("inf")

    def describe(self) -> str:
        """E.g. ``"about 1,560 distinct: text repeated 10.5x, 126 of 128 windows overlap another"``."""
        if self.repeats < 1.05 and not self.overlapping_windows:
            return "all distinct"
        return (f"about {self.distinct_tokens:,} distinct: text repeated {self.repeats:.1f}x, "
                f"{self.overlapping_windows} of {self.windows} windows overlap another")

    def warnings(self) -> list[str]:
        """What a user should hear about before pruning on these ids."""
        found = []
        if self.repeats >= REPEAT_WARNING:
            found.append(
                f"calibration: {self.windows} windows ({self.tokens:,} tokens) hold only about "
                f"{self.distinct_tokens:,} tokens of distinct text: it is repeated about {self.repeats:.1f}x, so "
                "the layers are fit to a small text and the held-out samples of damp='auto' overlap the fit "
                "samples; give more text, or fewer samples x seq_len"
            )
        if self.distinct_ids < FEW_IDS or self.dominant_share >= DOMINANT_SHARE:
            found.append(
                f"calibration: degenerate text: {self.distinct_ids} distinct token ids, the most frequent one "
                f"{self.dominant_share:.0%} of all tokens; the pruned model will be fit to it"
            )
        return found


def coverage(ids: torch.Tensor | list[torch.Tensor]) -> Coverage:
    """The :class:`Coverage` of ``(samples, seq_len)`` int64 ids (or a list of such batches)."""
    if isinstance(ids, list | tuple):
        ids = torch.cat([batch.reshape(batch.shape[0], -1) for batch in ids])
    ids = ids.to("cpu", torch.int64)
    windows, length = ids.shape
    span = max(1, min(SPAN, length))
    grams = _gram_hashes(ids, span)  # (windows, length - span + 1)
    flat = grams.reshape(-1)
    unique, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
    owners = torch.arange(windows).repeat_interleave(grams.shape[1])
    first_owner = torch.full((unique.numel(),), windows, dtype=torch.int64).scatter_reduce(
        0, inverse, owners, reduce="amin")
    last_owner = torch.full((unique.numel(),), -1, dtype=torch.int64).scatter_reduce(
        0, inverse, owners, reduce="amax")
    shared = first_owner != last_owner  # a k-gram two windows hold
    overlapping = torch.zeros(windows, dtype=torch.bool)
    overlapping[owners[shared[inverse]]] = True
    values, id_counts = torch.unique(ids, return_counts=True)
    lonely = windows - int(overlapping.sum())  # each a stretch of its own; the overlapping ones at least one
    stretches = lonely + (1 if overlapping.any() else 0)
    distinct_tokens = min(int(ids.numel()), unique.numel() + (span - 1) * stretches)
    return Coverage(
        tokens=int(ids.numel()), windows=int(windows), span=span,
        distinct_share=distinct_tokens / float(ids.numel()),
        overlapping_windows=int(overlapping.sum()), distinct_ids=int(values.numel()),
        dominant_share=float(id_counts.max()) / float(ids.numel()),
    )


def _gram_hashes(ids: torch.Tensor, span: int) -> torch.Tensor:
    """A polynomial hash of every ``span``-gram of every row (int64, wrapping)."""
    windows = ids.unfold(1, span, 1)  # (rows, positions, span)
    powers = torch.tensor([pow(_HASH, span - 1 - j, 2**61 - 1) for j in range(span)], dtype=torch.int64)
    return (windows * powers).sum(-1)
