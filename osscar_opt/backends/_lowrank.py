"""Exact low-rank bookkeeping for a kept column set (docs/architecture.md, "Scores the search needs").

:class:`KeptSet` holds, for the kept columns ``R`` of a :class:`LayerProblem`,

* ``Hinv`` (p x p): ``H_RR^{-1}`` embedded at the rows/columns of ``R``, zero elsewhere,
* ``B`` (p x r): ``H_RR^{-1} C_R`` (the kept weights in the thin-factor space), zero outside ``R``,
* ``loss``: ``c0 - trace(C_R^T H_RR^{-1} C_R)``,

and, once :meth:`KeptSet.track_outside` is called, for every column ``o`` outside ``R``,

* ``P`` (p x p): row ``o`` is ``H_oR H_RR^{-1}`` (zero in columns outside ``R``),
* ``E`` (p x r): row ``o`` is the residual correlation ``C_o - H_oR H_RR^{-1} C_R``.

``C`` is a thin factor of ``G`` (``G G^T = C C^T``, ``r = min(p, m)``): every score is a trace of a
quadratic form in ``G``, so it is unchanged when ``C`` replaces ``G``.

Every removal or addition of ``d`` columns is a rank-``d`` update of these buffers (cost
``O(p^2 d)``), never a refactorization; :meth:`KeptSet.refresh` recomputes everything from scratch
to bound round-off drift. Buffers are kept at full size ``p`` and masked, so updates are in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from osscar_opt.problem import LayerProblem


def thin_factor(G: torch.Tensor) -> torch.Tensor:
    """``C`` (p x r, r = min(p, m)) with ``C C^T = G G^T``; ``G`` itself when ``m <= p``."""
    p, m = G.shape
    if m <= p:
        return G
    gram = G.to(torch.float64) @ G.to(torch.float64).T
    values, vectors = torch.linalg.eigh(gram)
    return (vectors * values.clamp_min(0).sqrt()).to(G.dtype)


@dataclass
class Bucket:
    """All groups of one size ``d``: their ids and an ``(n, d)`` matrix of their columns."""

    size: int
    group_ids: torch.Tensor
    columns: torch.Tensor


def size_buckets(problem: LayerProblem, device: torch.device) -> list[Bucket]:
    """Groups bucketed by size so that block operations batch."""
    by_size: dict[int, list[int]] = {}
    for group_id, size in enumerate(problem.group_sizes):
        by_size.setdefault(size, []).append(group_id)
    groups = problem.groups
    buckets = []
    for size, ids in sorted(by_size.items()):
        columns = torch.stack([groups[g] for g in ids]).to(device)
        buckets.append(Bucket(size, torch.tensor(ids, device=device), columns))
    return buckets


def _spd_inverse(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of (a batch of) symmetric positive definite matrices via Cholesky."""
    factor, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):
        # Round-off made a block indefinite: fall back to a symmetric pseudo-inverse.
        values, vectors = torch.linalg.eigh(blocks)
        floor = values.abs().amax(-1, keepdim=True) * torch.finfo(blocks.dtype).eps * 16
        values = torch.where(values > floor, values, floor)
        return (vectors / values.unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return torch.cholesky_inverse(factor)


BLOCKED_INVERSE_MIN = 1024
"""Matrices at least this large are inverted by :func:`spd_inverse`'s blocked recursion (triangular
solves and GEMMs); smaller ones by ``cholesky_inverse`` (LAPACK ``potri``). At p = 4096 on a 2-core
CPU (2 threads, idle) Cholesky + inverse measured 3.0 Cholesky times against 3.7 with ``potri``
(1 thread: 3.1 against 3.4), with the same residual ``|H Hinv - I|`` (1e-12)."""

_BLOCKED_INVERSE_LEAF = 256


def _lower_inverse_(factor: torch.Tensor, out: torch.Tensor) -> None:
    """``out = factor^{-1}`` for a lower-triangular ``factor``; ``out``'s upper triangle must be 0."""
    n = factor.shape[0]
    if n <= _BLOCKED_INVERSE_LEAF:
        eye = torch.eye(n, dtype=factor.dtype, device=factor.device)
        out.copy_(torch.linalg.solve_triangular(factor, eye, upper=False))
        return
    h = n // 2
    A, C, D = factor[:h, :h], factor[h:, :h], factor[h:, h:]
    # [[A, 0], [C, D]]^{-1} = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], the corner by two triangular solves
    corner = torch.linalg.solve_triangular(A, C, upper=False, left=False)
    out[h:, :h] = torch.linalg.solve_triangular(D, corner, upper=False).neg_()
    _lower_inverse_(A, out[:h, :h])
    _lower_inverse_(D, out[h:, h:])


def _lower_transpose_times(lower: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``lower^T @ right`` for a lower-triangular ``lower`` (BLAS ``trmm``): the zero triangle is skipped."""
    n = lower.shape[0]
    if n <= _BLOCKED_INVERSE_LEAF:
        return lower.T @ right
    h = n // 2
    out = torch.empty((n, right.shape[1]), dtype=right.dtype, device=right.device)
    # [[A, 0], [C, D]]^T [[X], [Y]] = [[A^T X + C^T Y], [D^T Y]]
    out[:h] = torch.addmm(_lower_transpose_times(lower[:h, :h], right[:h]), lower[h:, :h].T, right[h:])
    out[h:] = _lower_transpose_times(lower[h:, h:], right[h:])
    return out


def _gram_into_(matrix: torch.Tensor, out: torch.Tensor) -> None:
    """``out = matrix^T @ matrix`` (BLAS ``syrk``): one triangle of blocks by GEMMs, mirrored."""
    n = matrix.shape[1]
    if n <= _BLOCKED_INVERSE_LEAF:
        out.copy_(matrix.T @ matrix)
        return
    h = n // 2
    _gram_into_(matrix[:, :h], out[:h, :h])
    _gram_into_(matrix[:, h:], out[h:, h:])
    out[h:, :h] = matrix[:, h:].T @ matrix[:, :h]
    out[:h, h:] = out[h:, :h].T


def _lower_gram_(inverse: torch.Tensor) -> None:
    """``inverse <- T^T T`` in place for a lower-triangular ``T = inverse`` (LAPACK ``lauum``), full symmetric."""
    n = inverse.shape[0]
    if n <= _BLOCKED_INVERSE_LEAF:
        inverse.copy_(inverse.T @ inverse)
        return
    h = n // 2
    A, C, D = inverse[:h, :h], inverse[h:, :h], inverse[h:, h:]
    # [[A, 0], [C, D]]^T [[A, 0], [C, D]] = [[A^T A + C^T C, C^T D], [D^T C, D^T D]]
    lower_left = _lower_transpose_times(D, C)
    corner = torch.empty((h, h), dtype=inverse.dtype, device=inverse.device)
    _gram_into_(C, corner)
    _lower_gram_(A)
    A.add_(corner)
    C.copy_(lower_left)
    inverse[:h, h:] = lower_left.T
    _lower_gram_(D)


def spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of one symmetric positive definite matrix: Cholesky, then (large matrices) the
    triangular inverse and its Gram ``L^{-T} L^{-1}`` by a blocked recursion of triangular solves
    and GEMMs, the arithmetic of LAPACK ``potri``; falls back to :func:`_spd_inverse` (and its
    pseudo-inverse for round-off indefinite matrices) where the Cholesky fails."""
    n = matrix.shape[-1]
    if matrix.dim() != 2 or n < BLOCKED_INVERSE_MIN:
        return _spd_inverse(matrix)
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return _spd_inverse(matrix)
    inverse = torch.zeros_like(factor)
    _lower_inverse_(factor, inverse)
    del factor
    _lower_gram_(inverse)
    return inverse


def quadratic_gains(E_rows: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``trace(E_g^T S_g^{-1} E_g)`` for every group ``g``: ``E_rows`` (n, d, r), ``S`` (n, d, d).

    Single columns (d = 1) divide instead of factorizing n 1 x 1 blocks, with the floor that
    :func:`_spd_inverse` puts on a round-off indefinite pivot (``16 eps |S|``)."""
    if S.shape[-1] == 1:
        pivots = S.reshape(-1)
        floor = pivots.abs() * (torch.finfo(S.dtype).eps * 16)
        pivots = torch.where(pivots > floor, pivots, floor)
        return E_rows.square().sum((1, 2)) / pivots
    return (E_rows * (_spd_inverse(S) @ E_rows)).sum((1, 2))


class KeptSet:
    """Low-rank state for a kept set of groups of one :class:`LayerProblem` (see module doc)."""

    def __init__(
        self,
        problem: LayerProblem,
        kept_groups,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.device = torch.device(device) if device is not None else problem.device
        self.dtype = dtype
        self.H = problem.H.to(self.device, dtype)
        self.C = thin_factor(problem.G.to(self.device, torch.float64)).to(dtype)
        self.c0 = problem.c0
        self.num_groups = problem.num_groups
        self.group_columns = [cols.to(self.device) for cols in problem.groups]
        self.buckets = size_buckets(problem, self.device)
        self.always_kept = problem.always_kept_columns.to(self.device)
        self.bucket_of_group = torch.zeros(self.num_groups, dtype=torch.int64)
        self.slot_of_group = torch.zeros(self.num_groups, dtype=torch.int64)
        for index, bucket in enumerate(self.buckets):
            self.bucket_of_group[bucket.group_ids.cpu()] = index
            self.slot_of_group[bucket.group_ids.cpu()] = torch.arange(bucket.group_ids.numel())
        # Group of every column (-1: always kept), for a vectorized kept-column mask.
        self.group_of_column = torch.full((self.num_columns,), -1, dtype=torch.int64, device=self.device)
        if self.num_groups:
            self.group_of_column[torch.cat(self.group_columns)] = torch.repeat_interleave(
                torch.arange(self.num_groups, device=self.device),
                torch.tensor([cols.numel() for cols in self.group_columns], device=self.device),
            )
        self.kept_group = torch.zeros(self.num_groups, dtype=torch.bool, device=self.device)
        self.kept_group[list(kept_groups)] = True
        self.tracking_outside = False
        self.updates_since_refresh = 0
        self.last_add_pivot = 1.0
        self.refresh()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_columns(self) -> int:
        return self.H.shape[0]

    def kept_columns_mask(self) -> torch.Tensor:
        grouped = self.group_of_column >= 0
        return ~grouped | self.kept_group[self.group_of_column.clamp_min(0)]

    def support(self) -> tuple[int, ...]:
        return tuple(torch.nonzero(self.kept_group).flatten().tolist())

    def columns_of(self, group_ids) -> torch.Tensor:
        return torch.cat([self.group_columns[int(g)] for g in group_ids])

    def _zeroed(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The buffer ``name`` zeroed in place when it exists with ``shape``, else a new zero tensor
        (re-using it spares the page faults of a fresh p x p allocation at every refresh)."""
        buffer = getattr(self, name, None)
        if isinstance(buffer, torch.Tensor) and tuple(buffer.shape) == shape:
            return buffer.zero_()
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def refresh(self) -> None:
        """Recompute ``Hinv``, ``B``, ``loss`` (and ``P``, ``E`` when tracked) from scratch."""
        p, r = self.C.shape
        kept = self.kept_columns_mask()
        R = torch.nonzero(kept).flatten()
        self.kept = kept
        if R.numel() == p:
            # Everything kept (the start of every descent): no gather from H, no scatter into Hinv.
            self.Hinv = spd_inverse(self.H)
            self.B = self.Hinv @ self.C
            self.loss = self.c0 - float((self.C * self.B).sum())
        else:
            self.Hinv = self._zeroed("Hinv", (p, p))
            self.B = self._zeroed("B", (p, r))
            if R.numel():
                inverse = spd_inverse(self.H[R.unsqueeze(1), R])
                self.Hinv[R.unsqueeze(1), R] = inverse
                B_R = inverse @ self.C[R]
                self.B[R] = B_R
                self.loss = self.c0 - float((self.C[R] * B_R).sum())
            else:
                self.loss = self.c0
        if self.tracking_outside:
            self._init_outside()
        self.updates_since_refresh = 0

    def track_outside(self) -> None:
        """Start maintaining ``P`` and ``E`` for the columns outside ``R`` (needed by adds)."""
        self.tracking_outside = True
        self._init_outside()

    def _init_outside(self) -> None:
        p, r = self.C.shape
        R = torch.nonzero(self.kept).flatten()
        O = torch.nonzero(~self.kept).flatten()
        self.P = self._zeroed("P", (p, p))
        self.E = self._zeroed("E", (p, r))
        self.S = [
            torch.zeros((b.columns.shape[0], b.size, b.size), dtype=self.dtype, device=self.device)
            for b in self.buckets
        ]
        if O.numel() == 0:
            return
        # Compact (|O| x |R|) blocks: P_OR = H_OR Hinv_RR, E_O = C_O - H_OR B_R; S from the same rows.
        H_OR = self.H[O.unsqueeze(1), R]
        P_OR = H_OR @ self.Hinv[R.unsqueeze(1), R]
        self.P[O.unsqueeze(1), R] = P_OR
        self.E[O] = torch.addmm(self.C[O], H_OR, self.B[R], alpha=-1)
        position = torch.full((p,), -1, dtype=torch.int64, device=self.device)
        position[O] = torch.arange(O.numel(), device=self.device)
        for index, bucket in enumerate(self.buckets):
            outside = ~self.kept_group[bucket.group_ids]
            if outside.any():
                cols = bucket.columns[outside]
                rows = position[cols]  # (n, d) rows of the compact blocks
                self.S[index][outside] = self._schur_from_rows(cols, P_OR[rows], H_OR[rows])

    def _schur_from_rows(self, cols: torch.Tensor, P_rows: torch.Tensor, H_rows: torch.Tensor) -> torch.Tensor:
        """``S_a = H_aa - P_aR H_Ra`` for outside groups ``cols`` (n, d) from their rows of P and H
        restricted to the same columns (n, d, k)."""
        H_aa = self.H[cols.unsqueeze(2), cols.unsqueeze(1)]
        if cols.shape[1] == 1:
            return H_aa - (P_rows * H_rows).sum(-1, keepdim=True)
        S = H_aa - P_rows @ H_rows.transpose(1, 2)
        return 0.5 * (S + S.transpose(1, 2))

    def _add_quadratic_(self, index: int, rows: torch.Tensor, factor: torch.Tensor, left: torch.Tensor | None = None,
                        alpha: float = 1.0) -> None:
        """``S[index] += alpha * left_g @ factor @ rows_g^T`` for every group ``g`` of bucket ``index``,
        where ``rows`` / ``left`` (p, k) hold one row per column (``left`` defaults to ``rows``)."""
        bucket = self.buckets[index]
        left = rows if left is None else left
        if bucket.size == 1:
            c = bucket.columns[:, 0]
            values = ((left[c] @ factor) * rows[c]).sum(1)
            self.S[index].view(-1).add_(values, alpha=alpha)
        else:
            block = left[bucket.columns] @ factor @ rows[bucket.columns].transpose(1, 2)
            self.S[index].add_(block, alpha=alpha)

    def _group_offsets(self, group_ids) -> list[tuple[int, int, int]]:
        """(group id, start, size) of each group inside ``columns_of(group_ids)``."""
        offsets, start = [], 0
        for g in group_ids:
            size = self.group_columns[int(g)].numel()
            offsets.append((int(g), start, size))
            start += size
        return offsets

    def _set_schur(self, group_id: int, block: torch.Tensor) -> None:
        index = int(self.bucket_of_group[group_id])
        self.S[index][int(self.slot_of_group[group_id])] = block

    # ------------------------------------------------------------------ updates
    def remove_groups(self, group_ids) -> float:
        """Remove kept groups jointly (rank-d downdate); returns the loss increase."""
        q = self.columns_of(group_ids)
        # Rows q of the symmetric Hinv are its columns q: a contiguous gather, not a strided one.
        hqT = self.Hinv.index_select(0, q)  # (dq, p)
        K = _spd_inverse(hqT[:, q])
        Bq = self.B.index_select(0, q)
        KBq = K @ Bq
        increase = float((Bq * KBq).sum())
        KhT = K @ hqT
        self.Hinv.addmm_(hqT.T, KhT, alpha=-1)
        self.B.addmm_(hqT.T, KBq, alpha=-1)
        self.Hinv.index_fill_(0, q, 0)
        self.Hinv.index_fill_(1, q, 0)
        self.B.index_fill_(0, q, 0)
        if self.tracking_outside:
            Pq = self.P.index_select(1, q)  # (p, dq)
            self.P.addmm_(Pq, KhT, alpha=-1)
            self.E.addmm_(Pq, KBq)
            KhT.index_fill_(1, q, 0)
            self.P.index_fill_(1, q, 0)
            self.P.index_copy_(0, q, KhT.neg_())
            self.E.index_copy_(0, q, KBq)
            for index in range(len(self.buckets)):
                self._add_quadratic_(index, Pq, K)
            for group_id, offset, size in self._group_offsets(group_ids):
                self._set_schur(group_id, K[offset : offset + size, offset : offset + size])
        self.kept[q] = False
        self.kept_group[torch.as_tensor(list(group_ids), device=self.device)] = False
        self.loss += increase
        self.updates_since_refresh += 1
        return increase

    def add_groups(self, group_ids) -> float:
        """Add outside groups jointly (block-inverse update); returns the loss decrease."""
        if not self.tracking_outside:
            self.track_outside()
        a = self.columns_of(group_ids)
        Pa = self.P.index_select(0, a)
        H_a = self.H.index_select(1, a)
        S = H_a[a] - Pa @ H_a
        S = 0.5 * (S + S.T)
        # Relative pivot: how independent the added columns are of the kept ones. Near 0 the
        # rank-d update divides round-off by round-off (callers verify such moves, _search.py).
        self.last_add_pivot = float(torch.linalg.eigvalsh(S).min()) / max(float(H_a[a].diagonal().max()), 1e-300)
        Sinv = _spd_inverse(S)
        Ea = self.E.index_select(0, a)
        xa = Sinv @ Ea
        gain = float((Ea * xa).sum())
        SinvPa = Sinv @ Pa
        # Outside rows first (they need the old P): W_o = H_oa - P_o H_Ra.
        outside = ~self.kept
        outside[a] = False
        # (H_a^T P^T)^T rather than P H_a: the same product, but as a wide GEMM output (da x p) it runs
        # 2 to 3 times faster on MKL than the tall-skinny (p x da) one (measured at p = 4096, da = 16..64).
        W = H_a - torch.mm(H_a.T, self.P.T).T
        W[~outside] = 0
        WS = W @ Sinv
        for index in range(len(self.buckets)):
            self._add_quadratic_(index, W, Sinv, left=W, alpha=-1)
        self.P.addmm_(WS, Pa, alpha=-1)
        self.P.index_copy_(1, a, WS)
        self.E.addmm_(WS, Ea, alpha=-1)
        self.P.index_fill_(0, a, 0)
        self.E.index_fill_(0, a, 0)
        # Kept side: block inverse. Pa is zero on the columns a (outside R), so are the rows -Sinv Pa.
        self.Hinv.addmm_(Pa.T, SinvPa)
        rows = SinvPa.neg_()
        rows[:, a] = Sinv
        self.Hinv.index_copy_(0, a, rows)
        self.Hinv.index_copy_(1, a, rows.T)
        self.B.addmm_(Pa.T, xa, alpha=-1)
        self.B.index_copy_(0, a, xa)
        self.kept[a] = True
        self.kept_group[torch.as_tensor(list(group_ids), device=self.device)] = True
        self.loss -= gain
        self.updates_since_refresh += 1
        return gain

    # ------------------------------------------------------------------ scores
    def removal_scores(self) -> torch.Tensor:
        """Loss increase of removing each kept group alone; ``+inf`` for groups not kept. (G,)"""
        scores = torch.full((self.num_groups,), float("inf"), dtype=self.dtype, device=self.device)
        row_norms = None
        for bucket in self.buckets:
            mask = self.kept_group[bucket.group_ids]
            if not mask.any():
                continue
            cols = bucket.columns[mask]
            if bucket.size == 1:
                c = cols[:, 0]
                if row_norms is None:  # one streaming pass over B beats gathering its kept rows
                    row_norms = torch.linalg.vector_norm(self.B, dim=1)
                values = row_norms[c].square() / self.Hinv.diagonal()[c]
            else:
                blocks = self.Hinv[cols.unsqueeze(2), cols.unsqueeze(1)]
                Bq = self.B[cols]
                values = (Bq * (_spd_inverse(blocks) @ Bq)).sum((1, 2))
            scores[bucket.group_ids[mask]] = values
        return scores

    def outside_schur(self, bucket_index: int, mask: torch.Tensor) -> torch.Tensor:
        """Maintained Schur complements of the outside groups ``mask`` of one bucket (n, d, d)."""
        return self.S[bucket_index][mask]

    def add_gains(self, excluded: torch.Tensor | None = None) -> torch.Tensor:
        """Loss decrease of adding each outside group alone; ``-inf`` for kept/excluded. (G,)"""
        if not self.tracking_outside:
            self.track_outside()
        gains = torch.full((self.num_groups,), float("-inf"), dtype=self.dtype, device=self.device)
        for index, bucket in enumerate(self.buckets):
            mask = ~self.kept_group[bucket.group_ids]
            if excluded is not None:
                mask &= ~excluded[bucket.group_ids]
            if not mask.any():
                continue
            cols = bucket.columns[mask]
            S = self.outside_schur(index, mask)
            gains[bucket.group_ids[mask]] = quadratic_gains(self.E[cols], S)
        return gains

    def score_batch_move(
        self, drop_ids: list[int], size: int, excluded: torch.Tensor | None = None
    ) -> tuple[float, list[int]]:
        """Exact loss of dropping ``drop_ids`` and adding the ``size`` best groups, not applied.

        After the joint removal of ``D`` (columns ``q``, ``K = (Hinv_qq)^{-1}``) every outside
        group ``o`` has ``E'_o = E_o + P_oq K B_q`` and ``S'_o = S_o + P_oq K P_oq^T``, and each
        dropped group ``g`` has ``E'_g = (K B_q)_g``, ``S'_g = K_gg``. The ``size`` groups of largest
        single add gain ``trace(E'^T S'^{-1} E')`` are then added jointly, scored with their joint
        Schur complement. Returns (loss after the move, added group ids).
        """
        if not self.tracking_outside:
            self.track_outside()
        q = self.columns_of(drop_ids)
        hqT = self.Hinv.index_select(0, q)  # (dq, p): rows q of the symmetric Hinv
        K = _spd_inverse(hqT[:, q])
        Bq = self.B.index_select(0, q)
        KBq = K @ Bq
        removal = float((Bq * KBq).sum())
        dropped = torch.zeros(self.num_groups, dtype=torch.bool, device=self.device)
        dropped[torch.as_tensor(drop_ids, device=self.device)] = True
        offsets = {group_id: start for group_id, start, _ in self._group_offsets(drop_ids)}
        # Reduced-support add quantities for every candidate column (rows of P', E').
        Pq = self.P.index_select(1, q)  # (p, dq): zero on kept rows
        P_q = Pq @ K
        E_new = torch.addmm(self.E, P_q, Bq)
        E_new.index_copy_(0, q, KBq)
        gains = torch.full((self.num_groups,), float("-inf"), dtype=self.dtype, device=self.device)
        for index, bucket in enumerate(self.buckets):
            mask = ~self.kept_group[bucket.group_ids] | dropped[bucket.group_ids]
            if excluded is not None:
                mask &= ~excluded[bucket.group_ids]
            if not mask.any():
                continue
            cols = bucket.columns[mask]
            rows = Pq[cols]  # (n, d, dq)
            if bucket.size == 1:
                S_new = self.S[index][mask] + ((rows @ K) * rows).sum(-1, keepdim=True)
            else:
                S_new = self.S[index][mask] + rows @ K @ rows.transpose(1, 2)
            ids = bucket.group_ids[mask]
            for position in torch.nonzero(dropped[ids]).flatten().tolist():
                start = offsets[int(ids[position])]
                S_new[position] = K[start : start + bucket.size, start : start + bucket.size]
            gains[bucket.group_ids[mask]] = quadratic_gains(E_new[cols], S_new)
        count = min(size, int(torch.isfinite(gains).sum()))
        add_ids = torch.argsort(gains, descending=True, stable=True)[:count].tolist()
        # Joint gain of the chosen groups against the reduced support.
        a = self.columns_of(add_ids)
        P_a = torch.addmm(self.P.index_select(0, a), P_q[a], hqT, alpha=-1)  # rows of H_aR' Hinv' for a outside R
        in_q = torch.isin(a, q)
        if in_q.any():
            position = {int(c): i for i, c in enumerate(q.tolist())}
            rows_in_q = torch.tensor([position[int(c)] for c in a[in_q].tolist()], device=self.device)
            P_a[in_q] = -(K[rows_in_q] @ hqT)
        P_a.index_fill_(1, q, 0)
        H_a = self.H.index_select(1, a)
        S_joint = H_a[a] - P_a @ H_a
        S_joint = 0.5 * (S_joint + S_joint.T)
        E_a = E_new[a]
        gain = float((E_a * (_spd_inverse(S_joint) @ E_a)).sum())
        return self.loss + removal - gain, add_ids

    def best_swap(
        self, candidates: torch.Tensor, excluded: torch.Tensor | None = None, max_elements: int = 1 << 22
    ) -> tuple[float, int, int]:
        """Exact best single swap: remove kept group ``g`` (from ``candidates``), add outside ``j``.

        For every pair the loss after the swap is computed exactly from the rank-d corrections of
        the add quantities for the removal of ``g`` (no independence assumption):
        ``E'_a = E_a + P_aq K B_q``, ``S'_a = S_a + P_aq K P_aq^T`` with ``K = (Hinv_qq)^{-1}``,
        and ``loss' = loss + rem_g - trace(E'^T S'^{-1} E')``. Returns (new loss, g, j).
        """
        if not self.tracking_outside:
            self.track_outside()
        best = (float("inf"), -1, -1)
        candidate_mask = torch.zeros(self.num_groups, dtype=torch.bool, device=self.device)
        candidate_mask[candidates] = True
        for in_bucket in self.buckets:
            q_mask = candidate_mask[in_bucket.group_ids] & self.kept_group[in_bucket.group_ids]
            if not q_mask.any():
                continue
            q_ids = in_bucket.group_ids[q_mask]
            q_cols = in_bucket.columns[q_mask]
            for out_index, out_bucket in enumerate(self.buckets):
                a_mask = ~self.kept_group[out_bucket.group_ids]
                if excluded is not None:
                    a_mask &= ~excluded[out_bucket.group_ids]
                if not a_mask.any():
                    continue
                a_ids = out_bucket.group_ids[a_mask]
                a_cols = out_bucket.columns[a_mask]
                S_a = self.outside_schur(out_index, a_mask)
                result = self._best_pair(q_ids, q_cols, a_ids, a_cols, S_a, max_elements)
                if result[0] < best[0]:
                    best = result
        return best

    def _best_pair(self, q_ids, q_cols, a_ids, a_cols, S_a, max_elements) -> tuple[float, int, int]:
        na, da = a_cols.shape
        nq, dq = q_cols.shape
        E_a = self.E[a_cols]  # (na, da, r)
        EE_a = E_a @ E_a.transpose(1, 2)
        a_flat = a_cols.reshape(-1)
        chunk = max(1, max_elements // max(1, na * da * max(da, dq)))
        best = (float("inf"), -1, -1)
        for start in range(0, nq, chunk):
            cols = q_cols[start : start + chunk]
            ids = q_ids[start : start + chunk]
            n = cols.shape[0]
            Hqq = self.Hinv[cols.unsqueeze(2), cols.unsqueeze(1)]  # (n, dq, dq)
            K = _spd_inverse(Hqq)
            Bq = self.B[cols]  # (n, dq, r)
            KBq = K @ Bq
            removal = (Bq * KBq).sum((1, 2))  # (n,)
            q_flat = cols.reshape(-1)
            P_aq = self.P[a_flat.unsqueeze(1), q_flat].view(na, da, n, dq).permute(0, 2, 1, 3)
            EB = (self.E[a_flat] @ self.B[q_flat].T).view(na, da, n, dq).permute(0, 2, 1, 3)
            if da == 1 and dq == 1:
                k = K.view(1, n)
                p_aq = P_aq.reshape(na, n)
                m_aq = p_aq * k
                S_new = S_a.view(na, 1) + m_aq * p_aq
                BB = Bq.square().sum((1, 2)).view(1, n)
                EE_new = EE_a.view(na, 1) + 2 * m_aq * EB.reshape(na, n) + m_aq.square() * BB
                gain = EE_new / S_new
            else:
                M = P_aq @ K.unsqueeze(0)  # (na, n, da, dq)
                S_new = S_a.unsqueeze(1) + M @ P_aq.transpose(2, 3)
                BB = Bq @ Bq.transpose(1, 2)  # (n, dq, dq)
                cross = EB @ M.transpose(2, 3)
                EE_new = EE_a.unsqueeze(1) + cross + cross.transpose(2, 3) + M @ BB.unsqueeze(0) @ M.transpose(2, 3)
                S_new = 0.5 * (S_new + S_new.transpose(2, 3))
                gain = torch.diagonal(_spd_inverse(S_new) @ EE_new, dim1=2, dim2=3).sum(-1)
            new_loss = self.loss + removal.view(1, n) - gain  # (na, n)
            flat = int(torch.argmin(new_loss))
            value = float(new_loss.view(-1)[flat])
            if value < best[0]:
                best = (value, int(ids[flat % n]), int(a_ids[flat // n]))
        return best
