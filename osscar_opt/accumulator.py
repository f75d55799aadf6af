"""Streaming accumulation of the layer statistics over calibration batches.

Formulations feed batches of layer inputs ``X`` (rows are tokens / patch positions) and, in
sequential mode, targets ``Y``; only ``X^T X``, ``X^T Y``, ``||Y||^2``, the column sums and the
row count are kept, all in float64, so memory does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from osscar_opt.problem import GroupsLike, LayerProblem, Moments, reconstruction_moments


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
        self.mass = 0.0  # sum of squared row weights (= rows when unweighted)
        if self.num_outputs is not None:
            m = self.num_outputs
            self.xty = torch.zeros((p, m), dtype=torch.float64, device=self.device)
            self.y_sum = torch.zeros(m, dtype=torch.float64, device=self.device)
            self.y_square = 0.0

    def add(self, X: torch.Tensor, Y: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
        """Add a batch: ``X`` of shape (n, p) and, when targets are tracked, ``Y`` of shape (n, m).

        Leading dimensions beyond two are flattened into rows (e.g. (batch, seq, p)). ``weights``
        (n,) scale each row's squared error (weighted least squares: row ``t`` enters as
        ``w_t x_t``, ``w_t y_t``, and the bias column as ``w_t``); None weighs every row 1.
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
        w = None
        if weights is not None:
            w = torch.as_tensor(weights).reshape(-1).to(self.device, torch.float64)
            if w.shape[0] != X.shape[0] or not torch.isfinite(w).all() or bool((w < 0).any()):
                raise ValueError(f"weights: expected {X.shape[0]} finite non-negative row weights")
            X = X * w[:, None]
        ones = torch.ones(X.shape[0], dtype=torch.float64, device=self.device) if w is None else w
        self.xtx.addmm_(X.T, X)
        self.x_sum += X.T @ ones
        self.rows += X.shape[0]
        self.mass += float(ones.square().sum())
        if Y is not None:
            Y = torch.as_tensor(Y)
            if Y.shape[-1] != self.num_outputs:
                raise ValueError(f"Y: expected shape (..., {self.num_outputs}), got {tuple(Y.shape)}")
            Y = Y.reshape(-1, self.num_outputs).to(self.device, torch.float64)
            if Y.shape[0] != X.shape[0]:
                raise ValueError(f"Y: has {Y.shape[0]} rows but X has {X.shape[0]}")
            if not torch.isfinite(Y).all():
                raise ValueError("Y: contains NaN or Inf entries")
            if w is not None:
                Y = Y * w[:, None]
            self.xty.addmm_(X.T, Y)
            self.y_sum += Y.T @ ones
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
        targets = None if self.num_outputs is None else (self.xty, self.y_sum, self.y_square)
        return LayerProblem.from_moments(
            self.xtx, self.x_sum, self.mass, W, groups, targets=targets, damp=damp, bias=bias,
            refit_bias=refit_bias, meta=meta,
        )

    def moments(self, W, *, bias=None, refit_bias: bool = False) -> Moments:
        """The raw (un-ridged) :class:`~osscar_opt.problem.Moments` of these rows for weight ``W`` (m x p).

        Same conventions as :meth:`problem` (``bias`` included in tracked targets; ``refit_bias``
        appends the constant-1 column); used as held-out statistics.
        """
        if self.rows == 0:
            raise ValueError("X: no calibration rows were accumulated")
        W = torch.as_tensor(W).to(self.device, torch.float64)
        if W.dim() != 2 or W.shape[1] != self.num_inputs:
            raise ValueError(f"W: expected shape (m, {self.num_inputs}), got {tuple(W.shape)}")
        targets = None if self.num_outputs is None else (self.xty, self.y_sum, self.y_square)
        b = None if bias is None else torch.as_tensor(bias).to(self.device, torch.float64)
        return reconstruction_moments(
            self.xtx, self.x_sum, self.mass, W, targets=targets, bias=b, refit_bias=refit_bias
        )

    def merged(self, other: StatsAccumulator) -> StatsAccumulator:
        """A new accumulator holding the rows of ``self`` and ``other`` (same shapes)."""
        if (other.num_inputs, other.num_outputs) != (self.num_inputs, self.num_outputs):
            raise ValueError("other: accumulators of different shapes cannot be merged")
        total = StatsAccumulator(self.num_inputs, self.num_outputs, device=self.device)
        total.xtx = self.xtx + other.xtx.to(self.device)
        total.x_sum = self.x_sum + other.x_sum.to(self.device)
        total.rows = self.rows + other.rows
        total.mass = self.mass + other.mass
        if self.num_outputs is not None:
            total.xty = self.xty + other.xty.to(self.device)
            total.y_sum = self.y_sum + other.y_sum.to(self.device)
            total.y_square = self.y_square + other.y_square
        return total


class SplitAccumulator:
    """Fit and held-out :class:`StatsAccumulator` s, split by calibration *sample*.

    Sample ``i`` (counted over all batches in order) is held out when ``i % every == every - 1``;
    whole samples (sequences, images) are held out, so held-out rows are not neighbours of fit rows.
    """

    def __init__(self, num_inputs: int, num_outputs: int | None = None, device=None, every: int = 4) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 2:
            raise ValueError(f"every: expected an integer >= 2, got {every!r}")
        self.fit = StatsAccumulator(num_inputs, num_outputs, device)
        self.heldout = StatsAccumulator(num_inputs, num_outputs, device)
        self.every = every
        self.samples = 0

    def heldout_mask(self, count: int) -> torch.Tensor:
        """Which of the next ``count`` samples are held out (bool, (count,))."""
        index = torch.arange(self.samples, self.samples + count)
        return index % self.every == self.every - 1

    def add(
        self, inputs: torch.Tensor, targets: torch.Tensor | None, *, input_rows, output_rows=None, row_weights=None
    ) -> None:
        """Add a batch whose first dimension is the sample: ``input_rows`` / ``output_rows`` turn
        a slice of ``inputs`` / ``targets`` into accumulator rows (a structure's row maps);
        ``row_weights`` (optional) maps input rows to their weights (see :meth:`StatsAccumulator.add`)."""
        count = inputs.shape[0]
        if targets is not None and targets.shape[0] != count:
            raise ValueError(f"targets: has {targets.shape[0]} samples but the inputs have {count}")
        mask = self.heldout_mask(count).to(inputs.device)
        self.samples += count
        for part, selected in ((self.fit, ~mask), (self.heldout, mask)):
            if bool(selected.any()):
                rows = input_rows(inputs[selected])
                part.add(
                    rows, None if targets is None else output_rows(targets[selected]),
                    None if row_weights is None else row_weights(rows),
                )

    def merged(self) -> StatsAccumulator:
        """All rows, fit and held-out together (the one-shot statistics)."""
        return self.fit.merged(self.heldout)


DAMP_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


def choose_damp(
    fit: Moments, heldout: Moments, columns: torch.Tensor, *, grid=DAMP_GRID
) -> tuple[float, dict[float, float]]:
    """The ridge (relative ``damp``) from ``grid`` whose re-fit of the kept ``columns`` on the
    ``fit`` rows has the lowest ``heldout`` error ``||Y - X B^T||^2``; returns it and every grid
    point's error (the first of equal errors wins)."""
    errors = {float(damp): heldout.error_on(columns, fit.ridge_fit(columns, damp)) for damp in grid}
    best = min(errors, key=lambda damp: errors[damp])
    return best, errors
