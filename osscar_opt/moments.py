"""Least-squares moments of one layer over a set of calibration rows (docs/architecture.md, "The layer problem").

:class:`Moments` holds ``X^T X``, ``X^T Y`` and ``||Y||^2`` of a layer's inputs and targets;
:func:`reconstruction_moments` builds them from input moments and the weight, with the bias kept
or re-fit. A :class:`~osscar_opt.problem.LayerProblem` adds the ridge to the fit rows' moments;
held-out moments measure how a support's re-fit weights generalize. Plain tensors, no module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
