r"""Relaxation bounds: the perspective function of a layer problem, its gradient, shifts, the relaxation.

The one home of the math that :func:`osscar_opt.certify` and the exact backends (``gurobi``,
``cvxpy``) share (docs/architecture.md, "Exact formulations" and "Relaxations and bounds").

**Thin factor.** The loss ``c0 - trace(G_R^T H_RR^{-1} G_R)`` depends on ``G`` (``p x m``) only
through ``G G^T``; :func:`thin_factor` returns ``C`` (``p x r``, ``r = min(p, m)``) with
``C C^T = G G^T`` and every formula below uses ``C`` in place of ``G``.

**Shift.** Split ``H = H' + D`` with ``D = blockdiag(D_g)`` block diagonal over the groups (and
one block for the always-kept columns) and ``H' >= 0``. The scalar shift is ``D = mu I`` with
``mu = lambda_min(H)``; the block shift is ``D = t * blockdiag(H_gg)`` with ``t`` the smallest
generalized eigenvalue of ``(H, blockdiag(H_gg))``, i.e. ``t = lambda_min(L_B^{-1} H L_B^{-T})``
for the block Cholesky factor ``L_B`` of ``blockdiag(H_gg)``. Both keep ``H - D >= 0``; both are
shrunk by a relative safety margin so that round-off cannot make ``H'`` indefinite.

**Perspective function.** With ``z`` in ``[0, 1]^G`` (``z = 1`` on always-kept columns) and
``B`` (``p x r``) the kept weights,

    phi(B, z) = tr(B^T H' B) - 2 tr(B^T C) + sum_g tr(B_g^T D_g B_g) / z_g + c0
    f(z)      = min_B phi(B, z) = c0 - tr(C^T (H' + D Z^{-1})^{-1} C).

``phi`` is jointly convex (``H' >= 0`` and ``||x||^2 / z`` is a perspective), so ``f`` is convex;
at a binary ``z`` the perspective forces ``B_g = 0`` where ``z_g = 0`` and ``H' + D = H`` on the
rest, so ``f(1_S) = loss(S)``.

**Safe evaluation.** Write ``D = L L^T`` (block Cholesky), ``Htilde = L^{-1} H L^{-T}``,
``K = Htilde - I = L^{-1} H' L^{-T} >= 0`` and ``Chat = L^{-1} C``. Since ``D Z^{-1} = L Z^{-1} L^T``
(``Z`` is constant on each block),

    (H' + D Z^{-1})^{-1} = L^{-T} Z^{1/2} (Z^{1/2} K Z^{1/2} + I)^{-1} Z^{1/2} L^{-1},

and ``M = Z^{1/2} K Z^{1/2} + I`` has eigenvalues ``>= 1`` for every ``z`` in ``[0, 1]`` (no
division by ``z``). With ``Y = M^{-1} Z^{1/2} Chat``: ``f(z) = c0 - <Z^{1/2} Chat, Y>``.

**Gradient (derivation).** By the envelope theorem ``df/dz_g = d phi / d z_g`` at the minimizer
``B*``: ``df/dz_g = -tr(B*_g^T D_g B*_g) / z_g^2``. The optimality condition of ``B`` is
``H' B + D Z^{-1} B = C``, i.e. ``D_g B_g / z_g = V_g`` with ``V = C - H' B*`` (the residual
correlation; rows of group ``g``). Hence ``B_g / z_g = D_g^{-1} V_g`` and

    df/dz_g = -tr(V_g^T D_g^{-1} V_g) = -||L_g^{-1} V_g||_F^2          (= -||V_g||_F^2 / mu for D = mu I).

In the whitened variables ``Vhat = L^{-1} V = Chat - K Z^{1/2} Y`` (because ``L^T B = Z^{1/2} Y``),
so ``grad_g f = -||Vhat_g||_F^2``, finite also at ``z_g = 0``. Every gradient entry is ``<= 0``
(adding a group never raises the loss).

**Linearization bound.** For any feasible ``z`` of ``{0 <= z <= 1, sum z <= k}``,
``f(z) + min_v grad f(z) . (v - z)`` over the vertices ``v`` (``k`` ones at the most negative
gradient entries) is a lower bound on the relaxation, hence on the optimal loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from osscar_opt.problem import LayerProblem

SHIFTS = ("scalar", "block")
# Relative shrink of the shift (times the spread of the spectrum) against round-off.
SHIFT_MARGIN = 1e-9
# Relative safety margin subtracted from every bound computed in floating point.
BOUND_MARGIN = 1e-9


def thin_factor(G: torch.Tensor) -> torch.Tensor:
    """``C`` of shape ``(p, min(p, m))`` with ``C C^T = G G^T`` (``G`` itself when ``m <= p``)."""
    p, m = G.shape
    if m <= p:
        return G.to(torch.float64)
    values, vectors = torch.linalg.eigh(G.to(torch.float64) @ G.to(torch.float64).T)
    return vectors * values.clamp_min(0.0).sqrt()


def _blocks(problem: LayerProblem) -> list[torch.Tensor]:
    """Column blocks of the shift: every group, then the always-kept columns (if any)."""
    blocks = [cols.to(problem.H.device) for cols in problem.groups]
    always = problem.always_kept_columns.to(problem.H.device)
    if always.numel():
        blocks.append(always)
    return blocks


@dataclass
class Shift:
    """A block-diagonal shift ``D = L L^T`` with ``H - D >= 0``.

    Attributes:
        kind: "scalar" or "block".
        L: ``(p, p)`` block lower-triangular factor of ``D`` (float64).
        L_inv: ``(p, p)`` its inverse (block diagonal).
        scale: ``mu`` for the scalar shift, ``t`` for the block shift.
    """

    kind: str
    L: torch.Tensor
    L_inv: torch.Tensor
    scale: float

    @property
    def D(self) -> torch.Tensor:
        """``(p, p)`` the shift matrix ``L L^T``."""
        return self.L @ self.L.T


def _safe(smallest: float, largest: float, name: str) -> float:
    """Shrink an eigenvalue bound by the round-off margin; it must stay positive."""
    safe = smallest * (1.0 - SHIFT_MARGIN) - 1e-3 * SHIFT_MARGIN * abs(largest)
    if not safe > 0:
        raise ValueError(f"problem: H is numerically singular, no positive {name} shift (lambda_min={smallest:.3g})")
    return safe


def scalar_shift(problem: LayerProblem) -> Shift:
    """``D = mu I`` with ``mu = lambda_min(H)`` (shrunk by a safety margin)."""
    H = problem.H.to(torch.float64)
    values = torch.linalg.eigvalsh(H)
    mu = _safe(float(values[0]), float(values[-1]), "scalar")
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    return Shift("scalar", math.sqrt(mu) * eye, eye / math.sqrt(mu), mu)


def _block_factor(problem: LayerProblem, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block Cholesky factor ``L`` of the block-diagonal ``D`` and its inverse (both ``(p, p)``)."""
    L = torch.zeros_like(D)
    L_inv = torch.zeros_like(D)
    for cols in _blocks(problem):
        index = torch.meshgrid(cols, cols, indexing="ij")
        block = 0.5 * (D[index] + D[index].T)
        factor = torch.linalg.cholesky(block)
        eye = torch.eye(cols.numel(), dtype=torch.float64, device=D.device)
        L[index] = factor
        L_inv[index] = torch.linalg.solve_triangular(factor, eye, upper=False)
    return L, L_inv


def shift_from_matrix(problem: LayerProblem, D: torch.Tensor, kind: str = "block", maximize: bool = False) -> Shift:
    """A valid :class:`Shift` from a block-diagonal positive definite ``D`` (``(p, p)``).

    ``D`` is scaled down when needed (to the largest valid multiple when ``maximize``, and always
    by the safety margin) so that ``H - D >= 0``:
    with ``H = L_H L_H^T``, ``H - s D >= 0`` exactly when ``s <= 1 / lambda_max(L_H^{-1} D L_H^{-T})``.
    """
    H = problem.H.to(torch.float64)
    L_H = torch.linalg.cholesky(H)
    half = torch.linalg.solve_triangular(L_H, D, upper=False)
    whitened = torch.linalg.solve_triangular(L_H, half.T, upper=False)
    largest = float(torch.linalg.eigvalsh(0.5 * (whitened + whitened.T))[-1])
    if not largest > 0:
        raise ValueError("shift: D must be positive definite")
    scale = (1.0 / largest if maximize else min(1.0, 1.0 / largest)) * (1.0 - 1e3 * SHIFT_MARGIN)
    L, L_inv = _block_factor(problem, scale * D)
    return Shift(kind, L, L_inv, scale)


def generalized_block_shift(problem: LayerProblem) -> Shift:
    """``D = t blockdiag(H_gg)``, ``t`` the smallest generalized eigenvalue of ``(H, blockdiag(H_gg))``."""
    H = problem.H.to(torch.float64)
    blockdiag = torch.zeros_like(H)
    for cols in _blocks(problem):
        index = torch.meshgrid(cols, cols, indexing="ij")
        blockdiag[index] = H[index]
    return shift_from_matrix(problem, blockdiag, "generalized", maximize=True)


def _supergradient_direction(fn: PerspectiveFunction, z: torch.Tensor, floor: float) -> torch.Tensor:
    """``floor * I + blockdiag(S_g)``, ``S_g = z_g (1 - z_g) U_g U_g^T`` with ``U = D^{-1} V`` at ``z``.

    ``S_g`` is the supergradient of the relaxation value with respect to ``D_g`` at the relaxed
    point (the perspective adds ``tr(B_g^T D_g B_g)(1 / z_g - 1)`` and ``B_g = z_g U_g``).
    """
    z = z.to(fn.K)
    root = fn.column_z(z).sqrt()
    M = root[:, None] * fn.K * root[None, :]
    M.diagonal().add_(1.0)
    Y = torch.cholesky_solve(root[:, None] * fn.C_hat, torch.linalg.cholesky(M))
    U = fn.shift.L_inv.T @ (fn.C_hat - fn.K @ (root[:, None] * Y))
    S = torch.zeros_like(fn.K)
    for group, cols in enumerate(fn.problem.groups):
        cols = cols.to(S.device)
        weight = float(z[group] * (1.0 - z[group]))
        S[torch.meshgrid(cols, cols, indexing="ij")] = weight * (U[cols] @ U[cols].T)
    S.diagonal().add_(floor)
    return S


def block_shift(problem: LayerProblem, keep: int, *, iterations: int = 60, steps: int = 4,
                time_limit: float | None = None) -> tuple[Shift, dict]:
    """The block-diagonal shift: the best valid ``D`` found on segments from the scalar shift.

    The relaxation bound is concave in ``D`` (a minimum of functions affine in ``D``) over the
    convex set ``{D block diagonal, 0 < D, H - D >= 0}``. Starting from ``mu I`` it tries two
    valid block-diagonal directions, the supergradient direction (each group's relaxed weights'
    outer product, scaled to the largest valid multiple) and ``t blockdiag(H_gg)``, and keeps the
    best point of each segment by a golden-section search (``steps`` rounds of two relaxations of
    ``iterations`` iterations). Returns the shift and ``{"scalar_bound", "block_bound",
    "evaluations", "seconds"}``; the block bound is never below the scalar one.
    """
    begin = time.perf_counter()
    H = problem.H.to(torch.float64)
    current = scalar_shift(problem)
    fn = PerspectiveFunction(problem, current)
    result = relax(fn, keep, iterations=iterations)
    scalar_bound = best_bound = result.bound
    evaluations = 1
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    direction = _supergradient_direction(fn, result.z, 1e-2 * current.scale)
    targets = [shift_from_matrix(problem, direction + 1e-12 * eye, maximize=True).D, generalized_block_shift(problem).D]
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for target in targets:
        base, low, high = current.D, 0.0, 1.0  # D(theta) = (1 - theta) base + theta target
        for _ in range(steps):
            if time_limit is not None and time.perf_counter() - begin > time_limit:
                break
            points = (high - golden * (high - low), low + golden * (high - low))
            values = []
            for theta in points:
                trial = shift_from_matrix(problem, (1 - theta) * base + theta * target)
                trial_result = relax(PerspectiveFunction(problem, trial), keep, iterations=iterations)
                evaluations += 1
                values.append(trial_result.bound)
                if trial_result.bound > best_bound:
                    best_bound, current = trial_result.bound, trial
            if values[0] >= values[1]:
                high = points[1]
            else:
                low = points[0]
    current.kind = "block"
    info = {"scalar_bound": scalar_bound, "block_bound": best_bound, "evaluations": evaluations,
            "seconds": time.perf_counter() - begin}
    return current, info


def make_shift(problem: LayerProblem, shift: str | Shift, keep: int | None = None) -> Shift:
    """The shift named ``shift`` ("scalar", or "block" which needs ``keep``), or ``shift`` itself."""
    if isinstance(shift, Shift):
        return shift
    if shift == "scalar":
        return scalar_shift(problem)
    if shift == "block":
        if keep is None:
            raise ValueError("keep: the block shift is tuned for a budget; pass keep")
        return block_shift(problem, keep)[0]
    raise ValueError(f"shift: expected one of {SHIFTS}, got {shift!r}")


class PerspectiveFunction:
    """``f(z)`` and ``grad f(z)`` of the module docstring for one problem and shift.

    Args:
        problem: the layer problem (``H`` p x p, ``C`` from ``G``).
        shift: "scalar", "block" or a :class:`Shift`.
    """

    def __init__(self, problem: LayerProblem, shift: str | Shift = "scalar", keep: int | None = None) -> None:
        self.problem = problem
        self.shift = make_shift(problem, shift, keep)
        H = problem.H.to(torch.float64)
        L_inv = self.shift.L_inv
        htilde = L_inv @ H @ L_inv.T
        self.K = 0.5 * (htilde + htilde.T) - torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
        self.C_hat = L_inv @ thin_factor(problem.G.to(H.device))
        self.c0 = problem.c0
        labels = problem.group_of_column.to(H.device)
        self.labels = labels
        self.always = labels < 0
        self.num_groups = problem.num_groups
        self.evaluations = 0

    def column_z(self, z: torch.Tensor) -> torch.Tensor:
        """``(p,)`` z repeated over each group's columns, 1 on always-kept columns."""
        zc = z.to(self.K)[self.labels.clamp_min(0)]
        return torch.where(self.always, torch.ones_like(zc), zc)

    def value_and_grad(self, z: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``f(z)`` (float, loss units) and ``grad f(z)`` (``(G,)`` float64, all ``<= 0``)."""
        z = torch.as_tensor(z, dtype=torch.float64, device=self.K.device).clamp(0.0, 1.0)
        if z.shape != (self.num_groups,):
            raise ValueError(f"z: expected shape ({self.num_groups},), got {tuple(z.shape)}")
        root = self.column_z(z).sqrt()
        M = root[:, None] * self.K * root[None, :]
        M.diagonal().add_(1.0)
        factor = torch.linalg.cholesky(M)
        rhs = root[:, None] * self.C_hat
        Y = torch.cholesky_solve(rhs, factor)
        value = self.c0 - float((rhs * Y).sum())
        residual = self.C_hat - self.K @ (root[:, None] * Y)
        per_column = residual.square().sum(1)
        grad = torch.zeros(self.num_groups, dtype=torch.float64, device=self.K.device)
        grad.index_add_(0, self.labels[~self.always], -per_column[~self.always])
        self.evaluations += 1
        return value, grad

    def value(self, z: torch.Tensor) -> float:
        """``f(z)`` only."""
        return self.value_and_grad(z)[0]


def linearization_bound(value: float, grad: torch.Tensor, z: torch.Tensor, keep: int) -> float:
    """``f(z) + min over vertices v of grad . (v - z)`` on ``{0 <= v <= 1, sum v <= keep}``."""
    negative = torch.clamp(grad, max=0.0)
    best = float(torch.topk(negative, keep, largest=False).values.sum()) if keep > 0 else 0.0
    return value + best - float(grad @ z.to(grad))


def safe_bound(bound: float, scale: float) -> float:
    """Subtract the floating-point safety margin (relative to ``scale``, e.g. ``c0``)."""
    return bound - BOUND_MARGIN * max(abs(scale), abs(bound), 1e-300)


def project_capped_simplex(y: torch.Tensor, keep: int) -> torch.Tensor:
    """Euclidean projection of ``y`` onto ``{0 <= z <= 1, sum z <= keep}`` (bisection on the shift)."""
    z = y.clamp(0.0, 1.0)
    if float(z.sum()) <= keep:
        return z
    low, high = 0.0, float(y.max())
    for _ in range(100):
        middle = 0.5 * (low + high)
        if float((y - middle).clamp(0.0, 1.0).sum()) > keep:
            low = middle
        else:
            high = middle
    return (y - high).clamp(0.0, 1.0)


@dataclass
class Cut:
    """A supporting hyperplane ``f(x) >= value + grad . (x - z)`` of the convex ``f``."""

    z: torch.Tensor
    value: float
    grad: torch.Tensor


@dataclass
class RelaxationResult:
    """Result of :func:`relax`.

    Attributes:
        bound: best valid lower bound found (safety margin included), loss units.
        history: best bound after every iteration (non-decreasing).
        z: the last iterate ``(G,)``.
        value: ``f(z)`` at the last iterate (the relaxation's primal value, an upper bound on its optimum).
        cuts: the linearizations computed (for outer-approximation masters).
        iterations: iterations done; ``seconds``: wall time.
    """

    bound: float
    history: list[float]
    z: torch.Tensor
    value: float
    cuts: list[Cut] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0


def _starting_point(num_groups: int, keep: int, start: Sequence[int] | None, device) -> torch.Tensor:
    if start is None:
        return torch.full((num_groups,), keep / num_groups, dtype=torch.float64, device=device)
    z = torch.zeros(num_groups, dtype=torch.float64, device=device)
    z[list(start)] = 1.0
    return z


def relax(
    fn: PerspectiveFunction,
    keep: int,
    *,
    iterations: int = 200,
    method: str = "projected-gradient",
    start: Sequence[int] | None = None,
    rel_tol: float = 1e-7,
    time_limit: float | None = None,
    keep_cuts: bool = False,
) -> RelaxationResult:
    """Lower-bound ``min f(z)`` over ``{0 <= z <= 1, sum z <= keep}`` and hence the optimal loss.

    ``method`` "frank-wolfe" moves along ``v - z`` (``v`` the linearization's vertex) with an
    Armijo-backtracked step; "projected-gradient" takes spectral (Barzilai-Borwein) projected
    gradient steps with a non-monotone line search. Both report the linearization bound at every
    iterate; the best one so far is ``bound``. Stops when the relative primal-dual gap is below
    ``rel_tol``, after ``iterations`` iterations or ``time_limit`` seconds.
    """
    if method not in ("frank-wolfe", "projected-gradient"):
        raise ValueError(f"method: expected 'frank-wolfe' or 'projected-gradient', got {method!r}")
    if isinstance(iterations, bool) or int(iterations) < 1:
        raise ValueError(f"iterations: expected a positive integer, got {iterations!r}")
    begin = time.perf_counter()
    device = fn.K.device
    z = _starting_point(fn.num_groups, keep, start, device)
    value, grad = fn.value_and_grad(z)
    best = -math.inf
    history: list[float] = []
    cuts: list[Cut] = []
    recent = [value]
    step = 1.0 / max(float(grad.abs().max()), 1e-300)
    done = 0
    for done in range(1, int(iterations) + 1):  # noqa: B007 - reported
        if keep_cuts:
            cuts.append(Cut(z.clone(), value, grad.clone()))
        best = max(best, safe_bound(linearization_bound(value, grad, z, keep), fn.c0))
        history.append(best)
        scale = max(abs(value), 1e-300)
        if value - best <= rel_tol * scale:
            break
        if time_limit is not None and time.perf_counter() - begin > time_limit:
            break
        if method == "frank-wolfe":
            vertex = torch.zeros_like(z)
            if keep > 0:
                vertex[torch.topk(grad, keep, largest=False).indices] = 1.0
            direction = vertex - z
            reference = value
        else:
            direction = project_capped_simplex(z - step * grad, keep) - z
            reference = max(recent[-10:])
        slope = float(grad @ direction)
        if slope >= 0:
            break
        gamma = 1.0
        for _ in range(30):
            candidate = z + gamma * direction
            new_value, new_grad = fn.value_and_grad(candidate)
            if new_value <= reference + 1e-4 * gamma * slope:
                break
            gamma *= 0.5
        s, y = candidate - z, new_grad - grad
        curvature = float(s @ y)
        step = float(s @ s) / curvature if curvature > 0 else step * 2.0
        z, value, grad = candidate, new_value, new_grad
        recent.append(value)
    return RelaxationResult(best, history, z, value, cuts, done, time.perf_counter() - begin)
