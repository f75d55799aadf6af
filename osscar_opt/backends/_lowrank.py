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
        mask = torch.zeros(self.num_columns, dtype=torch.bool, device=self.device)
        mask[self.always_kept] = True
        for g in torch.nonzero(self.kept_group).flatten().tolist():
            mask[self.group_columns[g]] = True
        return mask

    def support(self) -> tuple[int, ...]:
        return tuple(torch.nonzero(self.kept_group).flatten().tolist())

    def columns_of(self, group_ids) -> torch.Tensor:
        return torch.cat([self.group_columns[int(g)] for g in group_ids])

    def refresh(self) -> None:
        """Recompute ``Hinv``, ``B``, ``loss`` (and ``P``, ``E`` when tracked) from scratch."""
        p, r = self.C.shape
        kept = self.kept_columns_mask()
        R = torch.nonzero(kept).flatten()
        self.Hinv = torch.zeros((p, p), dtype=self.dtype, device=self.device)
        self.B = torch.zeros((p, r), dtype=self.dtype, device=self.device)
        self.kept = kept
        if R.numel():
            inverse = _spd_inverse(self.H[R][:, R])
            self.Hinv[R.unsqueeze(1), R] = inverse
            self.B[R] = inverse @ self.C[R]
            self.loss = self.c0 - float((self.C[R] * self.B[R]).sum())
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
        self.P = torch.zeros((p, p), dtype=self.dtype, device=self.device)
        self.E = torch.zeros((p, r), dtype=self.dtype, device=self.device)
        self.S = [
            torch.zeros((b.columns.shape[0], b.size, b.size), dtype=self.dtype, device=self.device)
            for b in self.buckets
        ]
        if O.numel() == 0:
            return
        self.E[O] = self.C[O]
        if R.numel():
            H_OR = self.H[O][:, R]
            self.P[O.unsqueeze(1), R] = H_OR @ self.Hinv[R][:, R]
            self.E[O] -= H_OR @ self.B[R]
        for index, bucket in enumerate(self.buckets):
            outside = ~self.kept_group[bucket.group_ids]
            if outside.any():
                self.S[index][outside] = self._schur_from_scratch(bucket.columns[outside])

    def _schur_from_scratch(self, cols: torch.Tensor) -> torch.Tensor:
        """``S_a = H_aa - H_aR Hinv H_Ra`` for outside groups with columns ``cols`` (n, d)."""
        Pa = self.P[cols]
        S = self.H[cols.unsqueeze(2), cols.unsqueeze(1)] - Pa @ self.H[cols].transpose(1, 2)
        return 0.5 * (S + S.transpose(1, 2))

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
        hq = self.Hinv[:, q].clone()
        K = _spd_inverse(hq[q])
        Bq = self.B[q].clone()
        KBq = K @ Bq
        increase = float((Bq * KBq).sum())
        KhT = K @ hq.T
        self.Hinv.addmm_(hq, KhT, alpha=-1)
        self.B.addmm_(hq, KBq, alpha=-1)
        self.Hinv[q] = 0
        self.Hinv[:, q] = 0
        self.B[q] = 0
        if self.tracking_outside:
            Pq = self.P[:, q].clone()
            self.P.addmm_(Pq, KhT, alpha=-1)
            self.E.addmm_(Pq, KBq)
            self.P[:, q] = 0
            self.P[q] = -KhT
            self.P[q.unsqueeze(1), q] = 0
            self.E[q] = KBq
            for index, bucket in enumerate(self.buckets):
                rows = Pq[bucket.columns]  # (n, d, dq)
                self.S[index] += rows @ K @ rows.transpose(1, 2)
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
        Pa = self.P[a].clone()
        H_a = self.H[:, a]
        S = H_a[a] - Pa @ H_a
        S = 0.5 * (S + S.T)
        # Relative pivot: how independent the added columns are of the kept ones. Near 0 the
        # rank-d update divides round-off by round-off (callers verify such moves, _search.py).
        self.last_add_pivot = float(torch.linalg.eigvalsh(S).min()) / max(float(H_a[a].diagonal().max()), 1e-300)
        Sinv = _spd_inverse(S)
        Ea = self.E[a].clone()
        xa = Sinv @ Ea
        gain = float((Ea * xa).sum())
        SinvPa = Sinv @ Pa
        # Outside rows first (they need the old P): W_o = H_oa - P_o H_Ra.
        outside = ~self.kept
        outside[a] = False
        W = H_a - self.P @ H_a
        W[~outside] = 0
        WS = W @ Sinv
        for index, bucket in enumerate(self.buckets):
            self.S[index] -= WS[bucket.columns] @ W[bucket.columns].transpose(1, 2)
        self.P.addmm_(WS, Pa, alpha=-1)
        self.P[:, a] = WS
        self.E.addmm_(WS, Ea, alpha=-1)
        self.P[a] = 0
        self.E[a] = 0
        # Kept side: block inverse.
        self.Hinv.addmm_(Pa.T, SinvPa)
        self.Hinv[:, a] = -SinvPa.T
        self.Hinv[a] = -SinvPa
        self.Hinv[a.unsqueeze(1), a] = Sinv
        self.B.addmm_(Pa.T, xa, alpha=-1)
        self.B[a] = xa
        self.kept[a] = True
        self.kept_group[torch.as_tensor(list(group_ids), device=self.device)] = True
        self.loss -= gain
        self.updates_since_refresh += 1
        return gain

    # ------------------------------------------------------------------ scores
    def removal_scores(self) -> torch.Tensor:
        """Loss increase of removing each kept group alone; ``+inf`` for groups not kept. (G,)"""
        scores = torch.full((self.num_groups,), float("inf"), dtype=self.dtype, device=self.device)
        for bucket in self.buckets:
            mask = self.kept_group[bucket.group_ids]
            if not mask.any():
                continue
            cols = bucket.columns[mask]
            if bucket.size == 1:
                c = cols[:, 0]
                values = self.B[c].square().sum(1) / self.Hinv[c, c]
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
            Ea = self.E[cols]
            gains[bucket.group_ids[mask]] = (Ea * (_spd_inverse(S) @ Ea)).sum((1, 2))
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
        hq = self.Hinv[:, q]
        K = _spd_inverse(hq[q])
        Bq = self.B[q]
        KBq = K @ Bq
        removal = float((Bq * KBq).sum())
        dropped = torch.zeros(self.num_groups, dtype=torch.bool, device=self.device)
        dropped[torch.as_tensor(drop_ids, device=self.device)] = True
        offsets = {group_id: start for group_id, start, _ in self._group_offsets(drop_ids)}
        # Reduced-support add quantities for every candidate column (rows of P', E').
        P_q = self.P[:, q] @ K  # (p, dq): zero on kept rows
        E_new = self.E + P_q @ Bq
        E_new[q] = KBq
        gains = torch.full((self.num_groups,), float("-inf"), dtype=self.dtype, device=self.device)
        for index, bucket in enumerate(self.buckets):
            mask = ~self.kept_group[bucket.group_ids] | dropped[bucket.group_ids]
            if excluded is not None:
                mask &= ~excluded[bucket.group_ids]
            if not mask.any():
                continue
            cols = bucket.columns[mask]
            rows = self.P[:, q][cols]  # (n, d, dq)
            S_new = self.S[index][mask] + rows @ K @ rows.transpose(1, 2)
            ids = bucket.group_ids[mask]
            for position in torch.nonzero(dropped[ids]).flatten().tolist():
                start = offsets[int(ids[position])]
                S_new[position] = K[start : start + bucket.size, start : start + bucket.size]
            E_rows = E_new[cols]
            gains[bucket.group_ids[mask]] = (E_rows * (_spd_inverse(S_new) @ E_rows)).sum((1, 2))
        count = min(size, int(torch.isfinite(gains).sum()))
        add_ids = torch.argsort(gains, descending=True, stable=True)[:count].tolist()
        # Joint gain of the chosen groups against the reduced support.
        a = self.columns_of(add_ids)
        P_a = self.P[a] - P_q[a] @ hq.T  # rows of H_aR' Hinv' for a outside R
        in_q = torch.isin(a, q)
        if in_q.any():
            position = {int(c): i for i, c in enumerate(q.tolist())}
            rows_in_q = torch.tensor([position[int(c)] for c in a[in_q].tolist()], device=self.device)
            P_a[in_q] = -(K @ hq.T)[rows_in_q]
        P_a[:, q] = 0
        S_joint = self.H[a][:, a] - P_a @ self.H[:, a]
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
