"""The sum-of-powers law ``y = E + sum_j A_j x_j^-p_j`` and its Huber fit on log y.

Parameters are ``theta = (e, a_1, p_1, a_2, p_2, ...)`` with ``E = exp(e)``,
``A_j = exp(a_j)``: the fit's search box is a box in theta. Callers pass each log x_j
centred (x_j over its geometric mean): A_j is then the term's size at the typical run, the
box and the grid of starts mean the same for every sweep, and an exponent moves without
dragging its amplitude along (the long a_j-p_j valley of uncentred x is gone). The loss is a Huber loss
(delta 1e-3) on log y, summed over rows and scaled by 1 / delta^2 so that L-BFGS-B's
relative stopping test is not met by a loss that is merely small (the early stop
Besiroglu et al. 2024 found in the original Chinchilla fit), with analytic gradients and
tight tolerances, from the best points of a grid of starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
# On the 1/delta^2-scaled loss: gtol 1e-8 is 1e-14 on the plain Huber sum. scipy's default
# (1e-5 unscaled) stops a warm-started refit at its start: intervals collapse.
LBFGS_OPTIONS = {"maxiter": 5000, "ftol": 1e-12, "gtol": 1e-8}


def one_blas_thread() -> threadpool_limits:
    """Context for many small L-BFGS-B fits: scipy's L-BFGS-B calls BLAS on 5-element vectors,
    and OpenBLAS's threads made each iteration 7-13 ms instead of 0.25-0.36 ms on a busy
    2-core VM (scipy 1.17, measured)."""
    return threadpool_limits(1, user_api="blas")


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber values and derivatives, scaled by 1 / delta^2."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)) / delta**2
    grad = np.where(small, r, delta * np.sign(r)) / delta**2
    return value, grad


def log_sum_of_powers(theta: np.ndarray, logs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(E + sum_j exp(a_j) x_j^-p_j) and its Jacobian in theta = (e, a_1, p_1, a_2, p_2, ...);
    ``logs``: (terms, rows), log x_j."""
    terms = [np.full(logs.shape[1], theta[0])]
    for j in range(logs.shape[0]):
        terms.append(theta[1 + 2 * j] - theta[2 + 2 * j] * logs[j])
    stack = np.stack(terms)
    top = stack.max(0)
    weights = np.exp(stack - top)
    total = weights.sum(0)
    weights /= total
    jac = np.empty((len(theta), logs.shape[1]))
    jac[0] = weights[0]
    for j in range(logs.shape[0]):
        jac[1 + 2 * j] = weights[1 + j]
        jac[2 + 2 * j] = -weights[1 + j] * logs[j]
    return top + np.log(total), jac


def objective(theta: np.ndarray, logs: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """The scaled Huber loss of log y and its gradient in theta."""
    pred, jac = log_sum_of_powers(theta, logs)
    value, grad = huber(pred - log_y, delta)
    return value.sum(), jac @ grad


def _grid_losses(grid: np.ndarray, logs: np.ndarray, log_y: np.ndarray, delta: float) -> np.ndarray:
    """Objective at every grid point at once: (points,)."""
    terms = [np.broadcast_to(grid[:, :1], (len(grid), logs.shape[1]))]
    for j in range(logs.shape[0]):
        terms.append(grid[:, 1 + 2 * j, None] - grid[:, 2 + 2 * j, None] * logs[j][None])
    stack = np.stack(terms)
    top = stack.max(0)
    pred = top + np.log(np.exp(stack - top).sum(0))
    return huber(pred - log_y[None], delta)[0].sum(1)


def _start_grid(terms: int) -> np.ndarray:
    e = np.array([-6.0, -3.0, -1.5, -0.5, 0.5])
    a = np.array([-8.0, -5.0, -3.0, -2.0, -1.0, 0.0, 1.0])
    p = np.array([0.05, 0.15, 0.3, 0.6, 1.0, 1.5])
    axes = [e] + [a, p] * terms
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def bounds(terms: int) -> list[tuple[float, float]]:
    """The search box of theta, for centred ``logs`` (each x_j over its geometric mean, so
    that A_j is the term's value at the typical run): E and each A_j from ~2e-9 to ~150
    and ~5e8, p_j in [0.001, 5]."""
    return [(-20.0, 5.0)] + [(-20.0, 20.0), (1e-3, 5.0)] * terms


@dataclass
class PowerFit:
    theta: np.ndarray  # (e, a_1, p_1, ...)
    loss: float  # the scaled Huber loss at theta
    converged: bool


def fit_sum_of_powers(logs: np.ndarray, y: np.ndarray, *, delta: float = HUBER_DELTA, starts: int = 6,
                      extra_starts: Sequence[np.ndarray] = ()) -> PowerFit:
    """Fit log y ~ log(E + sum_j A_j x_j^-p_j) from the ``starts`` best grid points (+ extra)."""
    log_y = np.log(y)
    picks = [np.asarray(s, float) for s in extra_starts]
    if starts:
        grid = _start_grid(logs.shape[0])
        picks += [grid[i] for i in np.argsort(_grid_losses(grid, logs, log_y, delta))[:starts]]
    with one_blas_thread():
        results = [minimize(objective, start, args=(logs, log_y, delta), jac=True, method="L-BFGS-B",
                            bounds=bounds(logs.shape[0]), options=LBFGS_OPTIONS) for start in picks]
    results = [r for r in results if np.all(np.isfinite(r.x)) and np.isfinite(r.fun)]
    if not results:
        return PowerFit(np.full(len(picks[0]), np.nan), math.inf, False)
    # Starts that reach the same optimum differ only in how L-BFGS-B stopped there: among
    # the optima equal to the best up to rounding, take one that converged, if any did.
    best_fun = min(r.fun for r in results)
    at_best = [r for r in results if r.fun <= best_fun + 1e-9 * max(1.0, abs(best_fun))]
    best = next((r for r in at_best if converged(r)), min(at_best, key=lambda r: r.fun))
    return PowerFit(best.x, float(best.fun), converged(best))


def converged(res) -> bool:
    # ABNORMAL_TERMINATION in the line search at the optimum is scipy's usual report of a
    # converged fit at these tolerances: accept it when the projected gradient is small.
    return bool(res.success) or float(np.max(np.abs(res.jac))) < 1e-3 * max(1.0, abs(res.fun))
