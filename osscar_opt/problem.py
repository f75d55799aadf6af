"""The reformulated layer problem (docs/architecture.md, "The layer problem").

A linear layer ``y = W x + b`` with ``W`` of shape ``(m, p)`` is pruned by removing *input groups*
(disjoint sets of input columns). With calibration inputs ``X`` (``n x p``) and targets ``Y``
(``n x m``) and ridge weight ``lam > 0`` the problem

    minimize ||Y - X What^T||_F^2 + lam ||W - What||_F^2   s.t.  What zero outside the kept groups

depends on the data only through ``H = X^T X + lam I`` (``p x p``), ``G = X^T Y + lam W^T``
(``p x m``) and ``c0 = ||Y||_F^2 + lam ||W||_F^2``. For kept columns ``R`` the optimal weights are
``What_R^T = H_RR^{-1} G_R`` and ``loss = c0 - trace(G_R^T H_RR^{-1} G_R)``.

This module knows nothing about torch modules: a :class:`LayerProblem` is plain tensors.
"""

from __future__ import annotations

import json
import math
import operator
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_NAME = "osscar_opt.LayerProblem"
FORMAT_VERSION = "1"

GroupsLike = Sequence[Sequence[int]] | torch.Tensor | Sequence[int]


def _as_float64(name: str, value, ndim: int | None = None) -> torch.Tensor:
    """Convert to a float64 CPU-or-same-device tensor, checking finiteness and rank."""
    try:
        tensor = torch.as_tensor(value)
    except Exception as exc:  # noqa: BLE001 - reported with the argument name
        raise ValueError(f"{name}: expected a numeric array, got {type(value).__name__}") from exc
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {tensor.dtype}")
    tensor = tensor.to(torch.float64)
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or Inf entries")
    return tensor


def _group_id(value) -> int:
    """An integer group id; floats (even 2.0), strings and bools are refused, never converted."""
    if isinstance(value, bool | str | bytes):
        raise TypeError(f"group id {value!r} is not an integer")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"group id {value!r} is not an integer") from None


def _column_indices(columns, group_id: int) -> torch.Tensor:
    """One group's column indices as a tensor; strings, nested lists and floats are refused by name."""
    if isinstance(columns, torch.Tensor):
        return columns
    if isinstance(columns, str | bytes) or not hasattr(columns, "__iter__"):
        raise ValueError(f"groups: group {group_id} must be a list of column indices, got {columns!r}")
    try:
        return torch.as_tensor([_group_id(column) for column in columns], dtype=torch.int64)
    except TypeError as exc:
        raise ValueError(f"groups: group {group_id} must be a flat list of integer column indices ({exc})") from None


def _is_label_vector(groups) -> bool:
    """True when ``groups`` is a flat integer array (group_of_column), not a list of groups."""
    if isinstance(groups, str | bytes):
        return False
    if isinstance(groups, torch.Tensor) or hasattr(groups, "__array__"):
        return torch.as_tensor(groups).dim() == 1
    return len(groups) > 0 and not hasattr(groups[0], "__len__") and not isinstance(groups[0], torch.Tensor)


def group_of_column_from(groups: GroupsLike, num_columns: int) -> torch.Tensor:
    """Normalize ``groups`` to an int64 vector ``group_of_column`` of length ``num_columns``.

    ``groups`` is either a sequence of disjoint index sequences (group ``g`` owns the listed
    columns; unlisted columns are always kept) or an integer array of length ``num_columns`` giving
    each column's group id, with -1 for always-kept columns. Group ids must be ``0..G-1``, each used.
    """
    if _is_label_vector(groups):
        labels = torch.as_tensor(groups)
        if labels.is_floating_point() or labels.dim() != 1:
            raise ValueError("groups: an integer group_of_column vector must be 1-D integers")
        if labels.numel() != num_columns:
            raise ValueError(f"groups: group_of_column has length {labels.numel()}, expected {num_columns}")
        labels = labels.to(torch.int64).cpu()
        if (labels < -1).any():
            raise ValueError("groups: group ids must be >= -1 (-1 marks an always-kept column)")
        used = labels[labels >= 0]
        if used.numel() == 0:
            raise ValueError("groups: no prunable group (every column is -1)")
        count = int(used.max()) + 1
        present = torch.zeros(count, dtype=torch.bool)
        present[used] = True
        if not present.all():
            missing = torch.nonzero(~present).flatten()[:5].tolist()
            raise ValueError(f"groups: group ids must be contiguous 0..{count - 1}; empty groups {missing}")
        return labels
    labels = torch.full((num_columns,), -1, dtype=torch.int64)
    if isinstance(groups, str | bytes) or len(groups) == 0:
        raise ValueError(f"groups: expected a list of column-index lists or a group_of_column vector, got {groups!r}")
    for group_id, columns in enumerate(groups):
        index = _column_indices(columns, group_id)
        if index.numel() == 0:
            raise ValueError(f"groups: group {group_id} is empty")
        if index.is_floating_point():
            raise ValueError(f"groups: group {group_id} has non-integer column indices")
        index = index.to(torch.int64).flatten().cpu()
        if (index < 0).any() or (index >= num_columns).any():
            raise ValueError(
                f"groups: group {group_id} has column indices outside [0, {num_columns - 1}]"
            )
        if index.unique().numel() != index.numel():
            raise ValueError(f"groups: group {group_id} lists a column twice")
        clash = labels[index] >= 0
        if clash.any():
            column = int(index[clash][0])
            raise ValueError(
                f"groups: groups overlap: column {column} is in group {int(labels[column])} and {group_id}"
            )
        labels[index] = group_id
    return labels


@dataclass
class Moments:
    """Raw (un-ridged) least-squares moments of one layer over a set of calibration rows.

    ``xtx`` is ``X^T X`` (p x p), ``xty`` is ``X^T Y`` (p x m) and ``y_square`` is ``||Y||_F^2``,
    where ``X`` has the same columns as the problem (the constant-1 bias column included when the
    bias is re-fit) and ``Y`` is the part of the target the kept weights reconstruct. ``anchor``
    ``(m, p)`` is what the ridge pulls the weights towards (the current weight, and bias);
    ``inputs`` is the number of input columns (``p`` without the bias column).
    A held-out :class:`Moments` measures how a support's re-fit weights generalize
    (:meth:`error`); :meth:`LayerProblem.from_moments` adds the ridge to the fit rows' moments.
    """

    xtx: torch.Tensor
    xty: torch.Tensor
    y_square: float
    rows: float
    anchor: torch.Tensor
    inputs: int

    def error(self, full_weights: torch.Tensor) -> float:
        """``||Y - X B^T||_F^2`` for weights ``B`` (m x p, bias column included), float64."""
        B = full_weights.to(self.xtx.device, torch.float64)
        if B.shape != self.anchor.shape:
            raise ValueError(f"full_weights: expected shape {tuple(self.anchor.shape)}, got {tuple(B.shape)}")
        columns = torch.nonzero(B.abs().sum(0)).flatten()
        return self.error_on(columns, B[:, columns].T)

    def error_on(self, columns: torch.Tensor, kept_t: torch.Tensor) -> float:
        """:meth:`error` of weights that are ``kept_t.T`` (m x |columns|) on ``columns`` and 0 elsewhere."""
        if columns.numel() == 0:
            return self.y_square
        xtx = self.xtx[columns][:, columns]
        return (
            self.y_square - 2.0 * float((kept_t * self.xty[columns]).sum()) + float(((xtx @ kept_t) * kept_t).sum())
        )

    def ridge(self, damp: float) -> float:
        """The ridge weight ``lam = damp * mean(diag(X^T X))`` over the input columns (the bias column
        left out; ``damp`` itself when the inputs never fire). The one rule, also for :class:`LayerProblem`."""
        scale = float(torch.diagonal(self.xtx)[: self.inputs].mean())
        return damp * scale if scale > 0 else float(damp)

    def ridge_fit(self, columns: torch.Tensor, damp: float) -> torch.Tensor:
        """Kept weights ``(|columns|, m)`` (transposed) of the ridge fit on ``columns`` at relative ``damp``."""
        lam = self.ridge(damp)
        H = self.xtx[columns][:, columns] + lam * torch.eye(len(columns), dtype=torch.float64, device=self.xtx.device)
        G = self.xty[columns] + lam * self.anchor[:, columns].T
        return torch.cholesky_solve(G, torch.linalg.cholesky(H))

    def to(self, device: torch.device | str | None = None) -> Moments:
        return Moments(
            self.xtx.to(device), self.xty.to(device), self.y_square, self.rows, self.anchor.to(device), self.inputs
        )


def reconstruction_moments(
    xtx: torch.Tensor,
    x_sum: torch.Tensor,
    rows: float,
    W: torch.Tensor,
    *,
    targets: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    bias: torch.Tensor | None = None,
    refit_bias: bool = False,
) -> Moments:
    """The :class:`Moments` of a layer with weight ``W`` (m x p, float64) from input moments.

    ``xtx`` (p x p), ``x_sum`` (p,) and ``rows`` describe the inputs; ``targets`` is ``(X^T Y,
    column sums of Y, ||Y||^2)`` of tracked targets (which include ``bias``), or None for
    ``Y = X W^T + bias``. Without ``refit_bias`` the bias is subtracted from the targets and kept
    as is; with it a constant-1 column is appended whose weight is the new bias.
    """
    m, p = W.shape
    device = xtx.device
    b = torch.zeros(m, dtype=torch.float64, device=device) if bias is None else bias.to(device, torch.float64)
    n = float(rows)
    if targets is None:
        xty = xtx @ W.T
        y_sum = W @ x_sum
        y_square = float((W @ xtx * W).sum())
    else:
        xty, y_sum, y_square = targets
        if bias is not None:
            # The tracked targets contain the bias: subtract it from every row.
            xty = xty - torch.outer(x_sum, b)
            y_square = y_square - 2.0 * float(b @ y_sum) + n * float(b @ b)
            y_sum = y_sum - n * b
    if not refit_bias:
        return Moments(xtx, xty, float(y_square), rows, W, p)
    # Augmented column of ones, its weight is the bias: targets are (Y - b) + b = Y_full.
    xtx_full = torch.zeros((p + 1, p + 1), dtype=torch.float64, device=device)
    xtx_full[:p, :p] = xtx
    xtx_full[:p, p] = x_sum
    xtx_full[p, :p] = x_sum
    xtx_full[p, p] = n
    xty_full = torch.cat([xty + torch.outer(x_sum, b), (y_sum + n * b)[None, :]], dim=0)
    y_full_square = y_square + 2.0 * float(b @ y_sum) + n * float(b @ b)
    anchor = torch.cat([W, b[:, None]], dim=1)
    return Moments(xtx_full, xty_full, float(y_full_square), rows, anchor, p)


class LayerProblem:
    """One layer's pruning problem: ``H`` (p x p), ``G`` (p x m), ``c0`` and the groups.

    Columns are the layer's input columns, plus a trailing constant-1 column when the bias is
    re-fit (``has_bias_column``); that column belongs to no group and is always kept.

    Attributes:
        H: ``(p, p)`` symmetric positive definite, ``X^T X + lam I``.
        G: ``(p, m)``, ``X^T Y + lam W^T``.
        c0: ``||Y||_F^2 + lam ||W||_F^2`` (float).
        group_of_column: ``(p,)`` int64, group id per column, -1 for always kept.
        lam: the ridge weight that was added to ``H`` (0 when unknown).
        xtx_diag: ``(p,)`` diagonal of ``X^T X`` (activation energy per column), or None.
        weight: the original ``(m, p_in)`` weight, or None (baselines fall back to ``H^{-1} G``).
        meta: free-form string metadata (layer name, structure kind), saved with the problem.
        keep: the budget (number of kept groups) the problem was solved with by the pipeline, or
            None; saved with the problem as an integer so that ``osscar solve`` / ``certify`` re-use it.
        input_var: ``(p_in,)`` variance of each input column over the calibration rows (FLAP's
            fluctuation), or None.
        heldout: :class:`Moments` of held-out calibration rows (not in ``H``), or None; backends
            that produce several candidate supports may pick the one whose re-fit weights have the
            lowest held-out error (``pipeline.prune(damp="auto")`` sets it).
        y_square: ``||Y||_F^2``, the data part of ``c0`` (the layer's target energy on the fit
            rows), or None when unknown (problems built from ``H`` and ``G`` alone, loaded files).
    """

    def __init__(
        self,
        H: torch.Tensor,
        G: torch.Tensor,
        c0: float,
        group_of_column: torch.Tensor,
        *,
        lam: float = 0.0,
        xtx_diag: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        has_bias_column: bool = False,
        meta: Mapping[str, str] | None = None,
        keep: int | None = None,
        input_var: torch.Tensor | None = None,
        heldout: Moments | None = None,
        y_square: float | None = None,
        validate: bool = True,
    ) -> None:
        self.H = H
        self.G = G
        self.c0 = float(c0)
        self.group_of_column = group_of_column
        self.lam = float(lam)
        self.xtx_diag = xtx_diag
        self.weight = weight
        self.has_bias_column = bool(has_bias_column)
        self.meta: dict[str, str] = {str(k): str(v) for k, v in (meta or {}).items()}
        self.input_var = input_var
        self.heldout = heldout
        self.y_square = None if y_square is None else float(y_square)
        if validate:
            self._validate()
        self._groups = [
            torch.nonzero(self.group_of_column == g).flatten() for g in range(self.num_groups)
        ]
        self._group_sizes = [int(cols.numel()) for cols in self._groups]
        self.keep = keep

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_activations(
        cls,
        X,
        W,
        groups: GroupsLike,
        *,
        damp: float = 1e-2,
        Y=None,
        bias=None,
        refit_bias: bool = False,
        meta: Mapping[str, str] | None = None,
    ) -> LayerProblem:
        """Build the problem from calibration inputs ``X`` (n x p) and the weight ``W`` (m x p).

        ``Y`` (n x m) is the target layer output (bias included when ``bias`` is given); it
        defaults to ``X W^T + bias``. ``bias`` (m,) is the layer's current bias: kept fixed, or
        re-fit when ``refit_bias`` (then the problem has a trailing constant-1 column and
        :meth:`bias` returns the new bias).
        ``lam = damp * mean(diag(X^T X))``.
        """
        X = _as_float64("X", X, ndim=2)
        W = _as_float64("W", W, ndim=2)
        if X.shape[1] != W.shape[1]:
            raise ValueError(f"X: has {X.shape[1]} columns but W has {W.shape[1]} (W must be (m, p))")
        targets = None
        if Y is not None:
            Y = _as_float64("Y", Y, ndim=2).to(X.device)
            if Y.shape != (X.shape[0], W.shape[0]):
                raise ValueError(f"Y: expected shape ({X.shape[0]}, {W.shape[0]}), got {tuple(Y.shape)}")
            targets = (X.T @ Y, Y.sum(0), float(Y.square().sum()))
        return cls.from_moments(
            X.T @ X, X.sum(0), X.shape[0], W, groups, targets=targets, damp=damp, bias=bias,
            refit_bias=refit_bias, meta=meta,
        )

    @classmethod
    def from_moments(
        cls,
        xtx: torch.Tensor,
        x_sum: torch.Tensor,
        rows: int,
        W,
        groups: GroupsLike,
        *,
        targets: tuple[torch.Tensor, torch.Tensor, float] | None = None,
        damp: float = 1e-2,
        bias=None,
        refit_bias: bool = False,
        meta: Mapping[str, str] | None = None,
    ) -> LayerProblem:
        """Build the problem from float64 moments of the calibration inputs and targets.

        ``xtx`` is ``X^T X`` (p x p), ``x_sum`` the column sums of ``X`` (p,), ``rows`` the number
        of rows ``n``; ``targets`` is ``(X^T Y (p x m), column sums of Y (m,), ||Y||_F^2)`` or None
        for ``Y = X W^T``. ``bias`` (m,) is the current bias (included in tracked targets when
        given). With ``refit_bias`` a constant-1 column (in no group) is appended; its optimal
        weight is the new bias, anchored by the ridge at ``bias``.
        """
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp < math.inf:
            raise ValueError(f"damp: expected a positive finite number, got {damp!r}")
        W = _as_float64("W", W, ndim=2).to(xtx.device)
        m, p = W.shape
        if p != xtx.shape[0]:
            raise ValueError(f"W: expected {xtx.shape[0]} columns (m, p), got shape {tuple(W.shape)}")
        if targets is not None and m != targets[0].shape[1]:
            raise ValueError(f"W: has {m} rows but the targets Y have {targets[0].shape[1]} columns")
        b = torch.zeros(m, dtype=torch.float64, device=xtx.device)
        if bias is not None:
            b = _as_float64("bias", bias, ndim=1).to(xtx.device)
            if b.shape[0] != m:
                raise ValueError(f"bias: expected {m} entries, got {b.shape[0]}")
        labels = group_of_column_from(groups, p)
        moments = reconstruction_moments(xtx, x_sum, rows, W, targets=targets, bias=b if bias is not None else None,
                                         refit_bias=refit_bias)
        xtx_diag = torch.diagonal(moments.xtx).clone()
        lam = moments.ridge(damp)
        columns = moments.xtx.shape[0]
        H = moments.xtx + lam * torch.eye(columns, dtype=torch.float64, device=xtx.device)
        G = moments.xty + lam * moments.anchor.T
        c0 = moments.y_square + lam * float(moments.anchor.square().sum())
        if refit_bias:
            labels = torch.cat([labels, torch.tensor([-1], dtype=torch.int64)])
        input_var = None
        if rows > 0:
            mean = x_sum / float(rows)
            input_var = (torch.diagonal(xtx) / float(rows) - mean.square()).clamp_min(0.0)
        return cls(
            H, G, c0, labels.to(xtx.device), lam=lam, xtx_diag=xtx_diag, weight=W,
            has_bias_column=refit_bias, meta=meta, input_var=input_var, y_square=moments.y_square,
        )

    @classmethod
    def from_statistics(
        cls,
        H,
        G,
        c0: float,
        groups: GroupsLike,
        *,
        lam: float = 0.0,
        xtx_diag=None,
        weight=None,
        meta: Mapping[str, str] | None = None,
    ) -> LayerProblem:
        """Build the problem directly from ``H`` (p x p, SPD), ``G`` (p x m) and ``c0``."""
        H = _as_float64("H", H, ndim=2)
        G = _as_float64("G", G, ndim=2)
        try:
            c0 = float(c0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"c0: expected a real number, got {c0!r}") from exc
        if H.shape[0] != H.shape[1]:
            raise ValueError(f"H: expected a square matrix, got shape {tuple(H.shape)}")
        labels = group_of_column_from(groups, H.shape[0])
        return cls(
            H,
            G,
            c0,
            labels.to(H.device),
            lam=lam,
            xtx_diag=None if xtx_diag is None else _as_float64("xtx_diag", xtx_diag, ndim=1),
            weight=None if weight is None else _as_float64("weight", weight, ndim=2),
            meta=meta,
        )

    def _validate(self) -> None:
        H, G = self.H, self.G
        for name, value in (("H", H), ("G", G)):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"{name}: expected a floating-point tensor")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}: contains NaN or Inf entries")
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H: expected a square (p, p) matrix, got shape {tuple(H.shape)}")
        p = H.shape[0]
        if G.dim() != 2 or G.shape[0] != p:
            raise ValueError(f"G: expected shape ({p}, m) to match H, got {tuple(G.shape)}")
        if not math.isfinite(self.c0):
            raise ValueError(f"c0: expected a finite number, got {self.c0}")
        scale = float(H.abs().max()) or 1.0
        asymmetry = float((H - H.T).abs().max())
        if asymmetry > 1e-8 * scale:
            raise ValueError(f"H: not symmetric (max |H - H^T| = {asymmetry:.3g}, scale {scale:.3g})")
        factor, info = torch.linalg.cholesky_ex(H.to(torch.float64))
        if int(info) != 0:
            raise ValueError(
                "H: not positive definite (after damping); increase damp / lam or drop dead columns"
            )
        self._check_c0(factor)
        labels = self.group_of_column
        if labels.dim() != 1 or labels.numel() != p:
            raise ValueError(f"groups: group_of_column must have length {p}")
        if labels.numel() and int(labels.max()) < 0:
            raise ValueError("groups: no prunable group")
        if self.has_bias_column and labels.numel() and int(labels[-1]) != -1:
            raise ValueError("groups: the bias column (the last one) must be always kept (label -1), not in a group")
        if self.xtx_diag is not None and self.xtx_diag.shape != (p,):
            raise ValueError(f"xtx_diag: expected shape ({p},), got {tuple(self.xtx_diag.shape)}")
        if self.xtx_diag is not None and not torch.isfinite(self.xtx_diag).all():
            raise ValueError("xtx_diag: contains NaN or Inf entries")
        p_in = p - int(self.has_bias_column)
        if self.weight is not None and (self.weight.dim() != 2 or tuple(self.weight.shape) != (G.shape[1], p_in)):
            raise ValueError(f"weight: expected shape ({G.shape[1]}, {p_in}) (m outputs, p inputs), "
                             f"got {tuple(self.weight.shape)}")
        if self.weight is not None and not torch.isfinite(self.weight).all():
            raise ValueError("weight: contains NaN or Inf entries")
        if self.c0 < -1e-9 * max(1.0, abs(self.c0)):
            raise ValueError(f"c0: must be >= 0 (a sum of squares), got {self.c0}")
        if self.input_var is not None and self.input_var.shape != (p_in,):
            raise ValueError(f"input_var: expected shape ({p_in},), got {tuple(self.input_var.shape)}")
        if self.heldout is not None and (
            self.heldout.xtx.shape != (p, p) or self.heldout.xty.shape != G.shape
        ):
            raise ValueError(
                f"heldout: expected moments of shapes ({p}, {p}) and {tuple(G.shape)}, got "
                f"{tuple(self.heldout.xtx.shape)} and {tuple(self.heldout.xty.shape)}"
            )

    def _check_c0(self, factor: torch.Tensor) -> None:
        """``c0`` must be at least ``trace(G^T H^-1 G)`` (the loss of keeping every column is a
        squared norm); below it every loss is wrong (negative before clipping), so refuse it.
        ``factor``: the Cholesky factor of ``H`` (float64)."""
        solved = torch.linalg.solve_triangular(factor, self.G.to(torch.float64), upper=False)
        explained = float(solved.square().sum())
        if self.c0 < explained - 1e-6 * max(abs(self.c0), explained, 1e-30):
            raise ValueError(
                f"c0: {self.c0:.6g} is below trace(G^T H^-1 G) = {explained:.6g}, the energy the columns explain; "
                "c0, H and G are inconsistent (c0 must be ||Y||^2 + lam ||W||^2 of the same data as H and G)"
            )

    # ------------------------------------------------------------------ sizes and groups
    @property
    def num_groups(self) -> int:
        """Number of prunable groups."""
        return int(self.group_of_column.max()) + 1

    @property
    def num_columns(self) -> int:
        """``p``: number of columns of ``H`` (input columns, plus the bias column if any)."""
        return self.H.shape[0]

    @property
    def num_inputs(self) -> int:
        """Number of input columns of the layer weight (``p`` without the bias column)."""
        return self.num_columns - int(self.has_bias_column)

    @property
    def num_outputs(self) -> int:
        """``m``: number of outputs (columns of ``G``)."""
        return self.G.shape[1]

    @property
    def groups(self) -> list[torch.Tensor]:
        """Column indices of every group (int64 tensors on the CPU)."""
        return list(self._groups)

    @property
    def group_sizes(self) -> list[int]:
        """Number of columns in every group."""
        return list(self._group_sizes)

    @property
    def always_kept_columns(self) -> torch.Tensor:
        """Columns that belong to no group (always kept), int64."""
        return torch.nonzero(self.group_of_column.cpu() < 0).flatten()

    @property
    def device(self) -> torch.device:
        return self.H.device

    @property
    def dtype(self) -> torch.dtype:
        return self.H.dtype

    def dead_groups(self) -> list[int]:
        """Groups whose input columns never fire on the calibration data (``diag(X^T X) == 0``)."""
        if self.xtx_diag is None:
            return []
        dead = self.xtx_diag.cpu() <= 0
        return [g for g, cols in enumerate(self._groups) if bool(dead[cols].all())]

    # ------------------------------------------------------------------ evaluation
    def check_support(self, support: Iterable[int], name: str = "support") -> tuple[int, ...]:
        """Validate a support (group ids) and return it sorted."""
        if isinstance(support, str | bytes):
            raise ValueError(f"{name}: expected an iterable of integer group ids, got the string {support!r}")
        try:
            ids = sorted(_group_id(g) for g in support)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: expected an iterable of integer group ids ({exc})") from exc
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name}: lists a group twice: {ids}")
        if ids and (ids[0] < 0 or ids[-1] >= self.num_groups):
            raise ValueError(f"{name}: group ids must be in [0, {self.num_groups - 1}], got {ids}")
        return tuple(ids)

    def kept_columns(self, support: Iterable[int]) -> torch.Tensor:
        """Sorted column indices kept by ``support`` (always-kept columns included)."""
        ids = self.check_support(support)
        parts = [self.always_kept_columns] + [self._groups[g] for g in ids]
        return torch.sort(torch.cat(parts)).values

    def _kept_solution(self, support: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return kept columns and ``What_R^T = H_RR^{-1} G_R`` (float64)."""
        columns = self.kept_columns(support).to(self.H.device)
        if columns.numel() == 0:
            return columns, self.G.new_zeros((0, self.num_outputs), dtype=torch.float64)
        H_RR = self.H[columns][:, columns].to(torch.float64)
        G_R = self.G[columns].to(torch.float64)
        factor = torch.linalg.cholesky(H_RR)
        return columns, torch.cholesky_solve(G_R, factor)

    def evaluate(self, support: Iterable[int]) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        """Loss, weight ``(m, p_in)`` and re-fit bias (or None) of ``support`` from one factorization."""
        columns, kept_t = self._kept_solution(support)
        full = torch.zeros((self.num_outputs, self.num_columns), dtype=torch.float64, device=self.H.device)
        if columns.numel() == 0:
            loss = self.c0
        else:
            # A sum of squares: a negative value is round-off (e.g. every column kept when the
            # target is the layer's own output), reported as 0.
            loss = max(0.0, self.c0 - float((self.G[columns].to(torch.float64) * kept_t).sum()))
            full[:, columns] = kept_t.T
        bias = full[:, -1] if self.has_bias_column else None
        return loss, full[:, : self.num_inputs], bias

    def loss(self, support: Iterable[int]) -> float:
        """``c0 - trace(G_R^T H_RR^{-1} G_R)`` for the kept groups ``support`` (float64)."""
        columns, kept_t = self._kept_solution(support)
        if columns.numel() == 0:
            return self.c0
        explained = float((self.G[columns].to(torch.float64) * kept_t).sum())
        return max(0.0, self.c0 - explained)  # negative only by round-off

    def full_weights(self, support: Iterable[int]) -> torch.Tensor:
        """Optimal ``(m, p)`` weight over all problem columns (bias column included), float64."""
        columns, kept_t = self._kept_solution(support)
        full = torch.zeros(
            (self.num_outputs, self.num_columns), dtype=torch.float64, device=self.H.device
        )
        if columns.numel():
            full[:, columns] = kept_t.T
        return full

    def weights(self, support: Iterable[int]) -> torch.Tensor:
        """Optimal ``(m, p_in)`` layer weight for ``support``: zeros in pruned columns (float64)."""
        return self.full_weights(support)[:, : self.num_inputs]

    def bias(self, support: Iterable[int]) -> torch.Tensor | None:
        """The re-fit bias ``(m,)`` when the problem re-fits the bias, else None."""
        if not self.has_bias_column:
            return None
        return self.full_weights(support)[:, -1]

    def heldout_error(self, support: Iterable[int]) -> float | None:
        """Held-out ``||Y - X B^T||^2`` of the weights re-fit on ``support`` (None without held-out rows)."""
        if self.heldout is None:
            return None
        columns, kept_t = self._kept_solution(support)
        return self.heldout.error_on(columns, kept_t)

    def reference_weight(self) -> torch.Tensor:
        """The original weight ``(m, p_in)``; without one, the unpruned least-squares fit."""
        if self.weight is not None:
            return self.weight
        return self.weights(range(self.num_groups))

    def subproblem(self, groups: Iterable[int]) -> LayerProblem:
        """The problem of these groups alone: reconstruct their own contribution to the output.

        With ``B = H^{-1} G`` the full least-squares weights (the dense weights when ``Y = X W^T``)
        and ``R`` the groups' columns: ``H_RR``, ``G_R = H_RR B_R`` and ``c0 = tr(B_R^T H_RR B_R)``,
        so keeping every chosen group costs 0. Group ``j`` of the result is ``groups[j]`` (in the
        order given); the bias column is not carried over. Used to build exactly solvable problems
        of 32-64 groups from real layers (a block of FFN neurons) for certification.
        """
        listed = list(groups) if not isinstance(groups, str | bytes) else groups
        if not self.check_support(listed, "groups"):
            raise ValueError("groups: expected at least one group id")
        order = [_group_id(g) for g in listed]
        columns = torch.cat([self.groups[g] for g in order]).to(self.H.device)
        labels = torch.cat([torch.full((self.group_sizes[g],), j, dtype=torch.int64) for j, g in enumerate(order)])
        H = self.H.to(torch.float64)
        full = torch.cholesky_solve(self.G.to(torch.float64), torch.linalg.cholesky(H))
        H_RR = H[columns][:, columns]
        G_R = H_RR @ full[columns]
        c0 = float((full[columns] * G_R).sum())
        meta = {**self.meta, "subproblem_of": self.meta.get("name", "problem"), "groups": ",".join(map(str, order))}
        return LayerProblem(H_RR, G_R, c0, labels.to(self.H.device), lam=self.lam, meta=meta)

    # ------------------------------------------------------------------ device, io
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LayerProblem:
        """A copy on ``device`` with floating tensors cast to ``dtype`` (labels stay int64)."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            return tensor.to(device=device, dtype=dtype or tensor.dtype)

        return LayerProblem(
            move(self.H),
            move(self.G),
            self.c0,
            self.group_of_column.to(device=device),
            lam=self.lam,
            xtx_diag=move(self.xtx_diag),
            weight=move(self.weight),
            has_bias_column=self.has_bias_column,
            meta=self.meta,
            keep=self.keep,
            input_var=move(self.input_var),
            y_square=self.y_square,
            heldout=None if self.heldout is None else self.heldout.to(device),
            validate=False,
        )

    def _serialized(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors (CPU, float64 / int64) and string metadata of the safetensors form."""
        tensors = {
            "H": self.H.detach().to("cpu", torch.float64).contiguous(),
            "G": self.G.detach().to("cpu", torch.float64).contiguous(),
            "group_of_column": self.group_of_column.detach().to("cpu", torch.int64).contiguous(),
        }
        if self.xtx_diag is not None:
            tensors["xtx_diag"] = self.xtx_diag.detach().to("cpu", torch.float64).contiguous()
        if self.weight is not None:
            tensors["weight"] = self.weight.detach().to("cpu", torch.float64).contiguous()
        if self.keep is not None:
            tensors["keep"] = torch.tensor(self._checked_keep(self.keep), dtype=torch.int64)
        if self.input_var is not None:
            tensors["input_var"] = self.input_var.detach().to("cpu", torch.float64).contiguous()
        if self.heldout is not None:
            for key in ("xtx", "xty", "anchor"):
                tensors[f"heldout.{key}"] = getattr(self.heldout, key).detach().to("cpu", torch.float64).contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "c0": repr(self.c0),
            "lam": repr(self.lam),
            "has_bias_column": "1" if self.has_bias_column else "0",
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        if self.heldout is not None:
            metadata["heldout.y_square"] = repr(self.heldout.y_square)
            metadata["heldout.rows"] = repr(float(self.heldout.rows))
            metadata["heldout.inputs"] = str(self.heldout.inputs)
        return tensors, metadata

    def save(self, path: str | os.PathLike) -> None:
        """Write the problem as safetensors (no pickle); the file is replaced atomically."""
        from safetensors.torch import save_file

        tensors, metadata = self._serialized()
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(temporary), metadata=metadata)
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()

    def to_bytes(self) -> bytes:
        """The problem in the safetensors form :meth:`save` writes, as bytes (how a batch sends
        in-memory problems to workers: no pickle)."""
        from safetensors.torch import save

        tensors, metadata = self._serialized()
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> LayerProblem:
        """Read :meth:`to_bytes`'s form; ``name`` stands for the source in error messages."""
        from safetensors.torch import load

        with _unreadable(name, "data"):
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ValueError(f"expected bytes, got {type(data).__name__}")
            data = bytes(data)
            if len(data) < 8:
                raise ValueError("too short for a safetensors header")
            size = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + size])
            metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
            cls._check_format(metadata, name)
            tensors = load(data)
        return cls._from_parts(tensors, metadata, name)

    @staticmethod
    def _check_format(metadata: dict[str, str], name: object) -> None:
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"path: {name} is not an osscar_opt LayerProblem file")
        if metadata.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"path: {name} has format version {metadata.get('version')!r}, "
                f"this osscar_opt reads version {FORMAT_VERSION}"
            )

    @classmethod
    def _read(cls, path: Path, names: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors (all, or those in ``names``) and metadata of a problem file; ValueError naming it."""
        from safetensors import safe_open

        if not path.is_file():
            raise ValueError(f"path: no such problem file: {path}")
        with _unreadable(path), safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            cls._check_format(metadata, path)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()  # noqa: SIM118
                       if names is None or key in names}
        return tensors, metadata

    @classmethod
    def peek(cls, path: str | os.PathLike) -> dict[str, Any]:
        """``{"name", "kind", "groups", "keep"}`` of a saved problem, read without its matrices
        (no ``H`` is loaded or factored); a foreign or corrupt file raises ValueError like :meth:`load`."""
        path = Path(path)
        tensors, metadata = cls._read(path, {"group_of_column", "keep"})
        try:
            meta = json.loads(metadata.get("meta", "{}"))
            labels = tensors["group_of_column"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"path: {path} is not a readable osscar_opt LayerProblem file ({exc!r})") from exc
        groups = int(labels.max()) + 1 if labels.numel() else 0
        return {"name": str(meta.get("name", path.stem)), "kind": str(meta.get("kind", "")), "groups": groups,
                "keep": _saved_keep(path, tensors.get("keep"))}

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerProblem:
        """Read a problem written by :meth:`save`; a corrupt or foreign file raises ValueError."""
        path = Path(path)
        return cls._from_parts(*cls._read(path), path)

    @classmethod
    def _from_parts(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: object) -> LayerProblem:
        """The problem from the safetensors form's tensors and metadata; ``path`` names the source in errors."""
        with _unreadable(path):
            c0 = float(metadata["c0"])
            lam = float(metadata["lam"])
            has_bias_column = metadata["has_bias_column"] == "1"
            meta = json.loads(metadata.get("meta", "{}"))
            H, G, labels = tensors["H"], tensors["G"], tensors["group_of_column"]
            heldout = None
            if "heldout.xtx" in tensors:
                heldout = Moments(
                    tensors["heldout.xtx"], tensors["heldout.xty"], float(metadata["heldout.y_square"]),
                    float(metadata["heldout.rows"]), tensors["heldout.anchor"], int(metadata["heldout.inputs"]),
                )
        if labels.dtype != torch.int64:
            raise ValueError(f"path: {path} has group_of_column of dtype {labels.dtype}, expected int64")
        try:
            if H.dim() != 2 or H.shape[0] != H.shape[1]:
                raise ValueError(f"H: expected a square (p, p) matrix, got shape {tuple(H.shape)}")
            labels_checked = group_of_column_from(labels, H.shape[0])
            return cls(
                H,
                G,
                c0,
                labels_checked,
                lam=lam,
                xtx_diag=tensors.get("xtx_diag"),
                weight=tensors.get("weight"),
                has_bias_column=has_bias_column,
                meta=meta,
                keep=_saved_keep(path, tensors.get("keep")),
                input_var=tensors.get("input_var"),
                heldout=heldout,
            )
        except ValueError as exc:  # an inconsistent field: name the file
            raise ValueError(f"path: {path} holds an invalid problem: {exc}") from exc

    @property
    def keep(self) -> int | None:
        """The saved budget (kept groups), or None."""
        return self._keep

    @keep.setter
    def keep(self, value: int | None) -> None:
        self._keep = None if value is None else self._checked_keep(value)

    def _checked_keep(self, value) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.num_groups:
            raise ValueError(f"keep: expected an integer in [0, {self.num_groups}], got {value!r}")
        return int(value)

    def __repr__(self) -> str:
        sizes = sorted(set(self._group_sizes))
        return (
            f"LayerProblem(columns={self.num_columns}, outputs={self.num_outputs}, "
            f"groups={self.num_groups}, group_sizes={sizes}, lam={self.lam:.3g}, "
            f"bias_column={self.has_bias_column}, meta={self.meta})"
        )


@contextmanager
def _unreadable(source: object, what: str = "file") -> Iterator[None]:
    """Turn any failure to parse ``source`` into ``ValueError("path: <source> is not a readable ...")``
    (an error that already names it passes unchanged)."""
    try:
        yield
    except ValueError as exc:
        if str(exc).startswith("path:"):
            raise
        raise ValueError(f"path: {source} is not a readable osscar_opt LayerProblem {what} ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"path: {source} is not a readable osscar_opt LayerProblem {what} ({exc})") from exc


def _saved_keep(path: Path, value: torch.Tensor | None) -> int | None:
    """The integer budget stored in a problem file (a 0-d int64 tensor), or None."""
    if value is None:
        return None
    if value.dtype != torch.int64 or value.dim() != 0:
        raise ValueError(f"path: {path} has a 'keep' field of dtype {value.dtype} and shape {tuple(value.shape)}, "
                         "expected a 0-d int64 tensor")
    return int(value)
