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

Why one module of over 600 lines: it is one job, the perspective relaxation, whose pieces (the
thin factor, the shifts, the function, its restriction to a partial assignment and the bound
searches) share the derivation above and each other's private factorizations; split, each part
would need that derivation again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from osscar_opt.problem import LayerProblem

SHIFTS = ("scalar", "diagonal", "block")
# Relative shrink of the shift (times the spread of the spectrum) against round-off.
SHIFT_MARGIN = 1e-9
# Relative safety margin subtracted from every bound computed in floating point.
BOUND_MARGIN = 1e-9
CENTRED = 4.0  # Newton decrement below which the barrier iterate counts as centred


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
    diagonal: torch.Tensor | None = None  # ``(p,)`` the diagonal of ``D`` when ``D`` is diagonal

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
    return Shift("scalar", math.sqrt(mu) * eye, eye / math.sqrt(mu), mu,
                 diagonal=torch.full((H.shape[0],), mu, dtype=torch.float64, device=H.device))


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


PATTERNS = ("diagonal", "block")


class _ShiftIterate:
    """A point ``D`` of the shift search: a vector ``d`` (diagonal pattern, ``D = diag(d)``) or one
    symmetric positive definite block per column block of :func:`_blocks` (block pattern)."""

    def __init__(self, problem: LayerProblem, diagonal: torch.Tensor | None, blocks: list[torch.Tensor] | None):
        self.problem, self.diagonal, self.blocks = problem, diagonal, blocks
        self.columns = _blocks(problem)

    def matrix(self) -> torch.Tensor:
        """``(p, p)`` the shift ``D``."""
        if self.diagonal is not None:
            return torch.diag(self.diagonal)
        D = torch.zeros(self.problem.num_columns, self.problem.num_columns, dtype=torch.float64,
                        device=self.blocks[0].device)
        for cols, block in zip(self.columns, self.blocks, strict=True):
            D[torch.meshgrid(cols, cols, indexing="ij")] = block
        return D

    def shift(self, kind: str) -> Shift:
        """The :class:`Shift` of ``D`` (not checked against ``H``: :func:`safe_shift` does that)."""
        if self.diagonal is not None:
            root = self.diagonal.sqrt()
            return Shift(kind, torch.diag(root), torch.diag(1.0 / root), 1.0, diagonal=self.diagonal.clone())
        L, L_inv = _block_factor(self.problem, self.matrix())
        return Shift(kind, L, L_inv, 1.0)

    def logdet(self) -> float:
        if self.diagonal is not None:
            return float(self.diagonal.log().sum())
        return float(sum(torch.linalg.slogdet(block)[1] for block in self.blocks))

    def inverse_parts(self, A_inv: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """The pattern's part of ``A_inv`` (``(p, p)``): its diagonal, or its diagonal blocks."""
        if self.diagonal is not None:
            return A_inv.diagonal().clone()
        return [A_inv[torch.meshgrid(cols, cols, indexing="ij")] for cols in self.columns]

    def step(self, gradient: list[torch.Tensor], eta: float) -> _ShiftIterate:
        """The geodesic step ``D_g^{1/2} exp(eta X_g / |X|) D_g^{1/2}`` on every block, with
        ``X_g = D_g^{1/2} gradient_g D_g^{1/2}`` (``|X|`` the largest spectral norm over blocks, so
        ``D`` changes by at most ``e^eta``). Block pattern only (the diagonal takes Newton steps)."""
        roots, scaled = [], []
        for block, grad in zip(self.blocks, gradient, strict=True):
            values, vectors = torch.linalg.eigh(block)
            root = (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T
            roots.append(root)
            scaled.append(root @ (0.5 * (grad + grad.T)) @ root)
        norm = max(float(torch.linalg.matrix_norm(x, ord=2)) for x in scaled)
        if not norm > 0:
            return self
        blocks = []
        for root, x in zip(roots, scaled, strict=True):
            values, vectors = torch.linalg.eigh(eta * x / norm)
            exp = (vectors * values.exp()) @ vectors.T
            new = root @ exp @ root
            blocks.append(0.5 * (new + new.T))
        return _ShiftIterate(self.problem, None, blocks)


def _initial_iterate(problem: LayerProblem, mu: float) -> _ShiftIterate:
    """The diagonal of ``0.9 (0.7 mu I + 0.3 t blockdiag(H_gg))``: strictly valid (the scalar and the
    generalized block shift are both valid, so is their convex combination and its diagonal part,
    and 0.9 of it is inside)."""
    generalized = generalized_block_shift(problem).D.diagonal()
    return _ShiftIterate(problem, 0.9 * (0.7 * mu + 0.3 * generalized), None)


def _shift_supergradient(fn: PerspectiveFunction, z: torch.Tensor, diagonal: bool):
    """Supergradient of ``f_D(z)`` in ``D`` on the pattern: ``S_g = z_g (1 - z_g) U_g U_g^T`` with
    ``U = D^{-1} V`` the relaxed weights over ``z`` (the perspective adds ``tr(B_g^T D_g B_g)
    (1 / z_g - 1)`` and ``B_g = z_g U_g``); 0 on always-kept columns. Diagonal: ``(p,)``."""
    z = z.to(fn.K)
    residual = fn.residual(z)  # Vhat = L^{-1} V
    column_z = fn.column_z(z)
    weight = column_z * (1.0 - column_z)
    if diagonal:
        return weight * residual.square().sum(1) / fn.shift.diagonal
    U = fn.shift.L_inv.T @ residual
    return [weight[cols, None] * (U[cols] @ U[cols].T) for cols in _blocks(fn.problem)]


def block_shift(problem: LayerProblem, keep: int, *, pattern: str = "block", iterations: int = 40,
                inner_iterations: int = 30, time_limit: float | None = None,
                start: torch.Tensor | None = None) -> tuple[Shift, dict]:
    """The shift ``D`` (diagonal, or block diagonal over the groups) that maximizes the relaxation bound.

    The relaxation value ``g(D) = min_z f_D(z)`` is concave in ``D`` (a minimum of functions
    affine in ``D``) and non-decreasing in the positive semidefinite order, over the convex set
    ``{D on the pattern, D > 0, H - D >= 0}``; its maximum is the SDP bound of the perspective
    relaxation. It is found by a barrier method on ``g(D) / t + logdet(H - D) + logdet D`` with
    ``g`` linearized at each step by its supergradient (``S_g = z_g (1 - z_g) U_g U_g^T``, see
    :func:`_shift_supergradient`), ``t`` shrinking by 4x whenever the iterate is centred:

    - diagonal pattern (also any problem of single-column groups): damped Newton steps (the
      interior-point step of ``max S.d s.t. diag(d) <= H``; the barrier's Hessian
      ``A^{-1} o A^{-1} + diag(d)^{-2}``, ``A = H - D``, couples the coordinates);
    - block pattern: the diagonal search first, then ``iterations / 2`` geodesic steps
      ``D_g^{1/2} exp(eta X_g) D_g^{1/2}`` on each block (``X_g`` the scaled gradient), ``eta``
      adapted (grown after an ascent, halved otherwise); the best iterate of both is kept, so it
      is never below the diagonal shift.

    Each evaluation of ``g`` is ``inner_iterations`` iterations of :func:`relax` warm-started from
    the previous relaxed point, so ``iterations`` steps cost about ``iterations * inner_iterations``
    factorizations of ``p x p``. Every iterate keeps ``H - D`` positive definite, and the returned
    shift is scaled to be valid with the safety margin (:func:`safe_shift`): every bound computed
    with it is valid however far the search got. It is the scalar shift when that bound is better.

    ``start``: a valid diagonal ``(p,)`` to warm-start from (e.g. a parent node's shift restricted
    to a partial assignment; 0.98 of it is used, strictly inside).

    Returns the shift and ``{"scalar_bound", "block_bound", "evaluations", "seconds", "pattern"}``
    (the best bound the search's relaxations reached, not a final certificate).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations: expected a non-negative integer, got {iterations!r}")
    search = _ShiftSearch(problem, keep, inner_iterations, time_limit)
    if start is None:  # the scalar shift is the baseline, and the fallback
        fallback = scalar_shift(problem)
        baseline = relax(PerspectiveFunction(problem, fallback), keep, iterations=max(inner_iterations, 30))
        first = _initial_iterate(problem, fallback.scale)
    else:  # the start is (0.98 of) the baseline
        first = _ShiftIterate(problem, 0.98 * start.to(torch.float64), None)
        fallback = safe_shift(problem, first.matrix(), "diagonal")
        baseline = relax(PerspectiveFunction(problem, fallback), keep, iterations=inner_iterations)
    search.offer_bound(baseline.bound, None)
    single = all(size == 1 for size in problem.group_sizes)
    current = search.evaluate(first, baseline.z)
    if current is not None:
        current = search.newton_diagonal(current, iterations)
        if pattern == "block" and not single:
            blocks = [current["iterate"].diagonal[cols].diag() for cols in _blocks(problem)]
            block_start = search.evaluate(_ShiftIterate(problem, None, blocks), current["result"].z)
            if block_start is not None:
                search.geodesic_blocks(block_start, (iterations + 1) // 2)
    kind = "block" if pattern == "block" and not single else pattern
    shift = fallback if search.best is None else safe_shift(problem, search.best.matrix(), kind)
    info = {"scalar_bound": baseline.bound if start is None else None, "block_bound": search.best_bound,
            "evaluations": search.evaluations,
            "seconds": time.perf_counter() - search.begin, "pattern": kind}
    return shift, info


class _ShiftSearch:
    """State of :func:`block_shift`: evaluations of ``g`` and the best iterate so far."""

    def __init__(self, problem: LayerProblem, keep: int, inner_iterations: int, time_limit: float | None):
        self.problem, self.keep, self.inner = problem, keep, inner_iterations
        self.H = problem.H.to(torch.float64)
        self.jitter = 1e-12 * float(self.H.diagonal().max())
        self.begin, self.time_limit = time.perf_counter(), time_limit
        self.best_bound, self.best, self.evaluations = -math.inf, None, 0

    def out_of_time(self) -> bool:
        return self.time_limit is not None and time.perf_counter() - self.begin > self.time_limit

    def offer_bound(self, bound: float, iterate: _ShiftIterate | None) -> None:
        if bound > self.best_bound:
            self.best_bound, self.best = bound, iterate

    def evaluate(self, iterate: _ShiftIterate, z: torch.Tensor | None) -> dict | None:
        """``g`` at ``iterate`` (warm-started at ``z``) with the barrier terms; None when ``H - D``
        is not positive definite."""
        A = self.H - iterate.matrix()
        A.diagonal().sub_(self.jitter)
        factor, failed = torch.linalg.cholesky_ex(A)
        if int(failed) != 0:
            return None
        fn = PerspectiveFunction(self.problem, iterate.shift("search"))
        result = relax(fn, self.keep, iterations=self.inner, start=z)
        self.evaluations += 1
        self.offer_bound(result.bound, iterate)
        return {"iterate": iterate, "fn": fn, "result": result, "A_inv": torch.cholesky_inverse(factor),
                "barrier": 2.0 * float(factor.diagonal().log().sum()) + iterate.logdet()}

    def newton_diagonal(self, current: dict, steps: int) -> dict:
        """Damped Newton path following on the diagonal ``d`` (``steps`` steps at most)."""
        t = 1e-2 * max(abs(current["result"].value), 1e-300) / self.H.shape[0]
        t_min = 1e-9 * t
        for _ in range(steps):
            if self.out_of_time() or t < t_min:
                break
            d = current["iterate"].diagonal
            supergradient = _shift_supergradient(current["fn"], current["result"].z, True)
            scaled_inverse = d[:, None] * current["A_inv"] * d[None, :]
            hessian = scaled_inverse.square()  # in the scaled variables delta = Delta / d: >= I
            hessian.diagonal().add_(1.0)
            factor = torch.linalg.cholesky(hessian)
            barrier_part = d * (1.0 / d - current["A_inv"].diagonal())
            for _ in range(8):  # centred: shrink t (the Hessian does not depend on t)
                rhs = d * supergradient / t + barrier_part
                delta = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
                decrement = math.sqrt(max(float(rhs @ delta), 0.0))
                if decrement > CENTRED or t < t_min:
                    break
                t *= 0.25
            # Backtracking from the full step: feasible and not below the current barrier objective;
            # the damped step 1 / (1 + decrement) (inside the Dikin ellipsoid) is taken if none is.
            objective = current["result"].value + t * current["barrier"]
            damped, eta, accepted = 1.0 / (1.0 + decrement), 1.0, None
            while accepted is None and eta > damped:
                moved = d * (1.0 + eta * delta)
                if bool((moved > 0).all()):
                    candidate = self.evaluate(_ShiftIterate(self.problem, moved, None), current["result"].z)
                    if candidate is not None and candidate["result"].value + t * candidate["barrier"] >= objective:
                        accepted = candidate
                eta *= 0.5
            for _ in range(20):
                if accepted is not None:
                    break
                moved = d * (1.0 + damped * delta)
                if bool((moved > 0).all()):
                    accepted = self.evaluate(_ShiftIterate(self.problem, moved, None), current["result"].z)
                damped *= 0.5
            if accepted is None:
                break
            current = accepted
        return current

    def geodesic_blocks(self, current: dict, steps: int) -> dict:
        """Geodesic barrier ascent on the diagonal blocks (``steps`` steps at most)."""
        t = 1e-5 * max(abs(current["result"].value), 1e-300) / self.H.shape[0]
        eta = 0.1
        for _ in range(steps):
            if self.out_of_time():
                break
            iterate, result = current["iterate"], current["result"]
            supergradient = _shift_supergradient(current["fn"], result.z, False)
            a_inverse = iterate.inverse_parts(current["A_inv"])
            gradient = [s + t * (torch.linalg.inv(block) - a)
                        for s, block, a in zip(supergradient, iterate.blocks, a_inverse, strict=True)]
            objective = result.value + t * current["barrier"]
            eta = max(eta, 1e-3)
            while eta > 1e-4:
                candidate = self.evaluate(iterate.step(gradient, eta), result.z)
                if candidate is not None and candidate["result"].value + t * candidate["barrier"] >= objective:
                    current, eta = candidate, min(1.0, 1.5 * eta)
                    break
                eta *= 0.5
            t *= 0.5
        return current


def safe_shift(problem: LayerProblem, D: torch.Tensor, kind: str) -> Shift:
    """:func:`shift_from_matrix` for a diagonal or block-diagonal ``D`` (keeps the diagonal form)."""
    shift = shift_from_matrix(problem, D, kind)
    if bool((torch.diag(D.diagonal()) == D).all()):
        shift.diagonal = (shift.scale * D.diagonal()).clone()
    return shift


def make_shift(problem: LayerProblem, shift: str | Shift, keep: int | None = None) -> Shift:
    """The shift named ``shift`` ("scalar"; "diagonal" or "block", which need ``keep``), or ``shift`` itself."""
    if isinstance(shift, Shift):
        return shift
    if shift == "scalar":
        return scalar_shift(problem)
    if shift in PATTERNS:
        if keep is None:
            raise ValueError(f"keep: the {shift} shift is tuned for a budget; pass keep")
        return block_shift(problem, keep, pattern=shift)[0]
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
        eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
        self.C = thin_factor(problem.G.to(H.device))
        if self.shift.diagonal is not None:  # D = diag(d): L^{-1} is a column scaling
            scaling = self.shift.diagonal.to(H).rsqrt()
            self.K = scaling[:, None] * H * scaling[None, :] - eye
            self.C_hat = scaling[:, None] * self.C
        else:
            L_inv = self.shift.L_inv
            htilde = L_inv @ H @ L_inv.T
            self.K = 0.5 * (htilde + htilde.T) - eye
            self.C_hat = L_inv @ self.C
        self.c0 = problem.c0
        labels = problem.group_of_column.to(H.device)
        self.labels = labels
        self.always = labels < 0
        self.num_groups = problem.num_groups
        self.evaluations = 0
        self.columns: torch.Tensor | None = None  # the problem's columns this function covers (None: all)

    def restrict(self, fixed_in: Sequence[int], fixed_out: Sequence[int],
                 diagonal: torch.Tensor | None = None) -> tuple[PerspectiveFunction, list[int]]:
        """``f`` at a partial assignment: groups ``fixed_in`` kept, ``fixed_out`` pruned.

        Returns the perspective function of the problem on the other ("free") groups, with the
        fixed-in groups' columns always kept and the fixed-out groups' columns removed, and the free
        group ids (its group ``j`` is ``free[j]``). The shift is block diagonal, so the restricted
        ``K`` and ``Chat`` are the rows and columns of this one's (``H_RR - D_RR >= 0`` holds for
        every principal submatrix): no factorization. Its relaxation over ``sum z <= keep - |fixed_in|``
        lower-bounds every support that contains ``fixed_in`` and avoids ``fixed_out``.

        ``diagonal`` (``(p,)``, over all columns): use the diagonal shift ``diag(diagonal)`` on the
        kept columns instead of this function's shift; it must satisfy ``H_RR - D_RR >= 0`` there
        (:func:`block_shift` on :meth:`partial_problem` gives one).
        """
        fixed_in, fixed_out = set(int(g) for g in fixed_in), set(int(g) for g in fixed_out)
        if fixed_in & fixed_out:
            raise ValueError(f"fixed_in, fixed_out: groups {sorted(fixed_in & fixed_out)} are in both")
        free = [g for g in range(self.num_groups) if g not in fixed_in and g not in fixed_out]
        labels = self.labels
        new_label = torch.full((self.num_groups,), -1, dtype=torch.int64, device=labels.device)
        new_label[torch.tensor(free, dtype=torch.int64, device=labels.device)] = torch.arange(
            len(free), dtype=torch.int64, device=labels.device)
        removed = torch.zeros(self.num_groups, dtype=torch.bool, device=labels.device)
        if fixed_out:
            removed[torch.tensor(sorted(fixed_out), dtype=torch.int64, device=labels.device)] = True
        keep_column = self.always | ~removed[labels.clamp_min(0)]
        columns = torch.nonzero(keep_column).flatten()
        restricted = object.__new__(PerspectiveFunction)
        restricted.problem, restricted.shift, restricted.c0 = self.problem, self.shift, self.c0
        restricted.C = self.C[columns]
        if diagonal is None:
            restricted.K = self.K[columns][:, columns]
            restricted.C_hat = self.C_hat[columns]
        else:
            scaling = diagonal.to(self.K)[columns].rsqrt()
            H = self.problem.H.to(self.K)[columns][:, columns]
            restricted.K = scaling[:, None] * H * scaling[None, :]
            restricted.K.diagonal().sub_(1.0)
            restricted.C_hat = scaling[:, None] * restricted.C
        column_label = torch.where(self.always[columns], torch.full_like(columns, -1),
                                   new_label[labels[columns].clamp_min(0)])
        restricted.labels = column_label
        restricted.always = column_label < 0
        restricted.num_groups = len(free)
        restricted.evaluations = 0
        restricted.columns = columns
        return restricted, free

    def partial_problem(self) -> LayerProblem:
        """The :class:`LayerProblem` whose perspective function this is: for a function returned by
        :meth:`restrict`, the partial assignment's problem (the kept columns' ``H`` and thin factor,
        fixed-in columns always kept, the free groups renumbered). Its valid shifts are valid shifts
        of the partial assignment."""
        if self.columns is None:
            return self.problem
        H = self.problem.H.to(self.K)[self.columns][:, self.columns]
        return LayerProblem(H, self.C, self.c0, self.labels.clone(), validate=False)

    def column_z(self, z: torch.Tensor) -> torch.Tensor:
        """``(p,)`` z repeated over each group's columns, 1 on always-kept columns."""
        zc = z.to(self.K)[self.labels.clamp_min(0)]
        return torch.where(self.always, torch.ones_like(zc), zc)

    def _solve(self, z: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``f(z)`` and the whitened residual ``Vhat = Chat - K Z^{1/2} Y`` (``(p, r)``)."""
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
        return value, self.C_hat - self.K @ (root[:, None] * Y)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """``(p, r)`` the whitened residual correlation ``Vhat = L^{-1} (C - H' B*)`` at ``z``."""
        return self._solve(z)[1]

    def value_and_grad(self, z: torch.Tensor) -> tuple[float, torch.Tensor]:
        """``f(z)`` (float, loss units) and ``grad f(z)`` (``(G,)`` float64, all ``<= 0``)."""
        value, residual = self._solve(z)
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
    """Euclidean projection of ``y`` onto ``{0 <= z <= 1, sum z <= keep}``, exactly, in ``O(G log G)``.

    When the box projection sums to more than ``keep`` the answer is ``clamp(y - tau, 0, 1)`` with
    ``s(tau) = sum clamp(y - tau, 0, 1) = keep``; ``s`` is piecewise linear and non-increasing with
    breakpoints at ``y_i`` and ``y_i - 1``, evaluated at all of them with sorted prefix sums, and
    ``tau`` is interpolated on the segment where ``s`` crosses ``keep``.
    """
    z = y.clamp(0.0, 1.0)
    if float(z.sum()) <= keep:
        return z
    if keep <= 0:
        return torch.zeros_like(y)
    ordered = torch.sort(y).values
    prefix = torch.cat([ordered.new_zeros(1), torch.cumsum(ordered, 0)])
    points = torch.sort(torch.cat([ordered, ordered - 1.0])).values

    def s(tau: torch.Tensor) -> torch.Tensor:
        low = torch.searchsorted(ordered, tau, right=True)  # entries <= tau contribute 0
        high = torch.searchsorted(ordered, tau + 1.0, right=False)  # entries >= tau + 1 contribute 1
        return (ordered.numel() - high) + (prefix[high] - prefix[low]) - tau * (high - low)

    sums = s(points)
    index = int(torch.nonzero(sums >= keep).max())
    if index + 1 >= points.numel():
        tau = points[index]
    else:
        left, right = points[index], points[index + 1]
        s_left, s_right = sums[index], sums[index + 1]
        tau = left if s_left == s_right else left + (s_left - keep) * (right - left) / (s_left - s_right)
    return (y - tau).clamp(0.0, 1.0)


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
        grad: ``grad f(z)`` at the last iterate ``(G,)``.
        cuts: the linearizations computed (for outer-approximation masters).
        iterations: iterations done; ``seconds``: wall time.
    """

    bound: float
    history: list[float]
    z: torch.Tensor
    value: float
    grad: torch.Tensor
    cuts: list[Cut] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0


def _starting_point(num_groups: int, keep: int, start: Sequence[int] | torch.Tensor | None, device) -> torch.Tensor:
    if start is None:
        return torch.full((num_groups,), keep / num_groups, dtype=torch.float64, device=device)
    if isinstance(start, torch.Tensor) and start.is_floating_point():  # a relaxed point
        if start.shape != (num_groups,):
            raise ValueError(f"start: expected a point of shape ({num_groups},), got {tuple(start.shape)}")
        return project_capped_simplex(start.to(device=device, dtype=torch.float64), keep)
    z = torch.zeros(num_groups, dtype=torch.float64, device=device)
    z[list(start)] = 1.0
    return z


def relax(
    fn: PerspectiveFunction,
    keep: int,
    *,
    iterations: int = 200,
    method: str = "projected-gradient",
    start: Sequence[int] | torch.Tensor | None = None,
    rel_tol: float = 1e-7,
    time_limit: float | None = None,
    keep_cuts: bool = False,
    cutoff: float | None = None,
) -> RelaxationResult:
    """Lower-bound ``min f(z)`` over ``{0 <= z <= 1, sum z <= keep}`` and hence the optimal loss.

    ``method`` "frank-wolfe" moves along ``v - z`` (``v`` the linearization's vertex) with an
    Armijo-backtracked step; "projected-gradient" takes spectral (Barzilai-Borwein) projected
    gradient steps with a non-monotone line search. Both report the linearization bound at every
    iterate; the best one so far is ``bound``. Stops when the relative primal-dual gap is below
    ``rel_tol``, after ``iterations`` iterations or ``time_limit`` seconds, or once the bound
    reaches ``cutoff`` (branch and bound: the node is pruned). ``start``: group ids (the binary
    point of a support) or a relaxed point ``(G,)`` (projected onto the feasible set).
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
        if value - best <= rel_tol * scale or (cutoff is not None and best >= cutoff):
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
    return RelaxationResult(best, history, z, value, grad, cuts, done, time.perf_counter() - begin)
