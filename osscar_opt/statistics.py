"""Streaming accumulation of the layer statistics over calibration batches.

Formulations feed batches of layer inputs ``X`` (rows are tokens / patch positions) and, in
sequential mode, targets ``Y``; only ``X^T X``, ``X^T Y``, ``||Y||^2``, the column sums and the
row count are kept, all in float64, so memory does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from osscar_opt.problem import GroupsLike, LayerProblem, _as_float64, group_of_column_from


class StatsAccumulator:
    """Accumulates ``X^T X`` (p x p) and, with targets, ``X^T Y`` (p x m) in float64.

    Args:
        num_inputs: ``p``, the number of input columns of the layer.
        num_outputs: ``m`` when targets ``Y`` will be given; None when ``Y = X W^T`` (the
            statistics for the target are then derived exactly from ``X^T X`` and ``W``).
        device: where the accumulators live (defaults to CPU).
    """

    def __init__(self, num_inputs: int, num_outputs: int | None = None, device=None) -> None:
        if int(num_inputs) <= 0:
            raise ValueError(f"num_inputs: expected a positive integer, got {num_inputs}")
        self.num_inputs = int(num_inputs)
        self.num_outputs = None if num_outputs is None else int(num_outputs)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        p = self.num_inputs
        self.xtx = torch.zeros((p, p), dtype=torch.float64, device=self.device)
        self.x_sum = torch.zeros(p, dtype=torch.float64, device=self.device)
        self.rows = 0
        if self.num_outputs is not None:
            m = self.num_outputs
            self.xty = torch.zeros((p, m), dtype=torch.float64, device=self.device)
            self.y_sum = torch.zeros(m, dtype=torch.float64, device=self.device)
            self.y_square = 0.0

    def add(self, X: torch.Tensor, Y: torch.Tensor | None = None) -> None:
        """Add a batch: ``X`` of shape (n, p) and, when targets are tracked, ``Y`` of shape (n, m).

        Leading dimensions beyond two are flattened into rows (e.g. (batch, seq, p)).
        """
        X = torch.as_tensor(X)
        if X.dim() < 2 or X.shape[-1] != self.num_inputs:
            raise ValueError(f"X: expected shape (..., {self.num_inputs}), got {tuple(X.shape)}")
        X = X.reshape(-1, self.num_inputs).to(self.device, torch.float64)
        if not torch.isfinite(X).all():
            raise ValueError("X: contains NaN or Inf entries")
        if (Y is None) != (self.num_outputs is None):
            raise ValueError(
                "Y: targets must be given with every batch exactly when num_outputs was set"
            )
        self.xtx.addmm_(X.T, X)
        self.x_sum += X.sum(0)
        self.rows += X.shape[0]
        if Y is not None:
            Y = torch.as_tensor(Y)
            if Y.shape[-1] != self.num_outputs:
                raise ValueError(f"Y: expected shape (..., {self.num_outputs}), got {tuple(Y.shape)}")
            Y = Y.reshape(-1, self.num_outputs).to(self.device, torch.float64)
            if Y.shape[0] != X.shape[0]:
                raise ValueError(f"Y: has {Y.shape[0]} rows but X has {X.shape[0]}")
            if not torch.isfinite(Y).all():
                raise ValueError("Y: contains NaN or Inf entries")
            self.xty.addmm_(X.T, Y)
            self.y_sum += Y.sum(0)
            self.y_square += float(Y.square().sum())

    def problem(
        self,
        W,
        groups: GroupsLike,
        *,
        damp: float = 1e-2,
        bias=None,
        refit_bias: bool = False,
        meta: Mapping[str, str] | None = None,
    ) -> LayerProblem:
        """Build the :class:`LayerProblem` for weight ``W`` (m x p) and ``groups``.

        Without targets, ``Y = X W^T``. ``bias`` (m,) is the current bias: the targets tracked
        with :meth:`add` include it when given. With ``refit_bias`` a constant-1 column (in no
        group) is appended; its optimal weight is the new bias, anchored by the ridge at ``bias``.
        """
        if self.rows == 0:
            raise ValueError("X: no calibration rows were accumulated")
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not damp > 0 or damp != damp:
            raise ValueError(f"damp: expected a positive number, got {damp!r}")
        W = _as_float64("W", W, ndim=2).to(self.device)
        m, p = W.shape
        if p != self.num_inputs:
            raise ValueError(f"W: expected {self.num_inputs} columns (m, p), got shape {tuple(W.shape)}")
        if self.num_outputs is not None and m != self.num_outputs:
            raise ValueError(f"W: has {m} rows but the targets Y have {self.num_outputs} columns")
        b = torch.zeros(m, dtype=torch.float64, device=self.device)
        if bias is not None:
            b = _as_float64("bias", bias, ndim=1).to(self.device)
            if b.shape[0] != m:
                raise ValueError(f"bias: expected {m} entries, got {b.shape[0]}")
        labels = group_of_column_from(groups, p)

        xtx_diag = torch.diagonal(self.xtx).clone()
        mean_energy = float(xtx_diag.mean())
        lam = damp * mean_energy if mean_energy > 0 else float(damp)
        n = float(self.rows)

        # X^T Y and ||Y||^2 for the part of Y the kept weights reconstruct, and the Y column sums.
        if self.num_outputs is None:
            xty = self.xtx @ W.T
            y_sum = W @ self.x_sum
            y_square = float((W @ self.xtx * W).sum())
        else:
            xty = self.xty
            y_sum = self.y_sum
            y_square = self.y_square
            if bias is not None:
                # The tracked targets contain the bias: subtract it from every row.
                xty = xty - torch.outer(self.x_sum, b)
                y_square = y_square - 2.0 * float(b @ y_sum) + n * float(b @ b)
                y_sum = y_sum - n * b
            else:
                pass
        if not refit_bias:
            H = self.xtx + lam * torch.eye(p, dtype=torch.float64, device=self.device)
            G = xty + lam * W.T
            c0 = y_square + lam * float(W.square().sum())
            return LayerProblem(
                H, G, c0, labels.to(self.device), lam=lam, xtx_diag=xtx_diag, weight=W, meta=meta
            )
        # Augmented column of ones, its weight is the bias: targets are (Y - b) + b = Y_full.
        H = torch.zeros((p + 1, p + 1), dtype=torch.float64, device=self.device)
        H[:p, :p] = self.xtx
        H[:p, p] = self.x_sum
        H[p, :p] = self.x_sum
        H[p, p] = n
        H += lam * torch.eye(p + 1, dtype=torch.float64, device=self.device)
        y_full_sum = y_sum + n * b
        xty_full = xty + torch.outer(self.x_sum, b)
        G = torch.cat([xty_full, y_full_sum[None, :]], dim=0)
        W_aug = torch.cat([W, b[:, None]], dim=1)
        G = G + lam * W_aug.T
        y_full_square = y_square + 2.0 * float(b @ y_sum) + n * float(b @ b)
        c0 = y_full_square + lam * float(W_aug.square().sum())
        labels_aug = torch.cat([labels, torch.tensor([-1], dtype=torch.int64)])
        xtx_diag_aug = torch.cat([xtx_diag, torch.tensor([n], dtype=torch.float64, device=self.device)])
        return LayerProblem(
            H,
            G,
            c0,
            labels_aug.to(self.device),
            lam=lam,
            xtx_diag=xtx_diag_aug,
            weight=W,
            has_bias_column=True,
            meta=meta,
        )
