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

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from osscar_opt import problem_file
from osscar_opt.groups import GroupsLike, as_group_id, group_of_column_from
from osscar_opt.moments import Moments, reconstruction_moments

__all__ = ["GroupsLike", "LayerProblem", "Moments", "group_of_column_from", "reconstruction_moments"]


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
            ids = sorted(as_group_id(g) for g in support)
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
        order = [as_group_id(g) for g in listed]
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

    def save(self, path: str | os.PathLike) -> None:
        """Write the problem as safetensors (:mod:`osscar_opt.problem_file`); replaced atomically."""
        problem_file.write(self, path)

    def to_bytes(self) -> bytes:
        """The problem in the form :meth:`save` writes, as bytes (how a batch sends in-memory
        problems to workers: no pickle)."""
        return problem_file.to_bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> LayerProblem:
        """Read :meth:`to_bytes`'s form; ``name`` stands for the source in error messages."""
        return cls._from_file(*problem_file.read_bytes(data, name), name)

    @classmethod
    def peek(cls, path: str | os.PathLike) -> dict[str, Any]:
        """``{"name", "kind", "groups", "keep"}`` of a saved problem, read without its matrices
        (no ``H`` is loaded or factored); a foreign or corrupt file raises ValueError like :meth:`load`."""
        return problem_file.peek(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerProblem:
        """Read a problem written by :meth:`save`; a corrupt or foreign file raises ValueError."""
        path = Path(path)
        return cls._from_file(*problem_file.read(path), path)

    @classmethod
    def _from_file(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: object) -> LayerProblem:
        """The problem from its file form; an inconsistent field is a ValueError naming ``source``."""
        arguments = problem_file.constructor_arguments(tensors, metadata, source)
        try:
            arguments["group_of_column"] = group_of_column_from(arguments["group_of_column"], arguments["H"].shape[0])
            return cls(**arguments)
        except ValueError as exc:  # an inconsistent field: name the file
            raise ValueError(f"path: {source} holds an invalid problem: {exc}") from exc

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
