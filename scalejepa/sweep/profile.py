"""Profile-likelihood intervals for the Huber fits of ``powerlaw.py``.

Why not the row bootstrap: when one term of the law is small next to the noise (a
data-limited sweep, say), its amplitude and exponent trade off along a long, flat valley
of the loss; refits of resampled rows stay near the full-data optimum and the percentile
interval is narrow around a value the rows do not determine (coverage measured in
``benchmarks/results/fit_coverage_*.md``). The profile asks which values the rows rule out:

    the interval of a quantity q (a parameter, or one derived from them such as N_opt at a
    budget) is every v for which the best fit with q held at v is worse than the best fit
    by less than the F(1, n - p) quantile, on the likelihood-ratio scale.

The fit minimises a Huber loss, not a likelihood: its rise is put on the likelihood-ratio
scale with the Huber's own constants, ``2 dD E[psi'] / E[psi^2]`` (the drop-in-dispersion
test of Schrader & Hettmansperger 1980), evaluated for Gaussian log-error residuals of the
fit's RMS (n - p degrees of freedom). A profile that never rises that far before the search
range ends leaves the interval open at that end: the rows do not bound the quantity there.

Each quantity is held fixed by solving one parameter of theta from the others and v
(``Quantity.solve``, with its Jacobian), so each profile point is an L-BFGS-B fit of the
remaining parameters, warm-started from the previous point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize
from scipy.stats import f as f_dist

from scalejepa.sweep.powerlaw import HUBER_DELTA, LBFGS_OPTIONS, bounds, log_sum_of_powers, objective, one_blas_thread

# The interval's ends are located to 0.1% of the last step of the walk that crossed them.
_XTOL = 1e-3


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    lo_open: bool  # the rows do not bound the quantity from below (within the search range)
    hi_open: bool


@dataclass(frozen=True)
class Quantity:
    """A function q(theta) held at v by solving one parameter from the others."""

    name: str
    value: Callable[[np.ndarray], float]
    solved: int  # the index in theta that ``solve`` computes
    solve: Callable[[np.ndarray, float], tuple[np.ndarray, np.ndarray]]  # (free, v) -> theta, d theta / d free
    limits: Callable[[float], tuple[float, float]]  # v at the optimum -> the search range of v
    free_bounds: Callable[[float], list[tuple[float, float]]]  # v -> the box of the free parameters

    def free(self, theta: np.ndarray) -> np.ndarray:
        return np.delete(theta, self.solved)


def linear(name: str, weights: Sequence[float], solved: int) -> Quantity:
    """``weights . theta`` (a parameter, or e.g. an uncentred log amplitude a_j + p_j m_j),
    held by solving theta[solved] (its weight must be nonzero); searched over the box."""
    w = np.asarray(weights, float)
    box = bounds((len(w) - 1) // 2)
    rest = np.delete(w, solved)
    span = (float(sum(min(wi * lo, wi * hi) for wi, (lo, hi) in zip(w, box))),
            float(sum(max(wi * lo, wi * hi) for wi, (lo, hi) in zip(w, box))))
    jac = np.insert(np.eye(len(w) - 1), solved, -rest / w[solved], axis=0)

    def solve(free: np.ndarray, v: float) -> tuple[np.ndarray, np.ndarray]:
        return np.insert(free, solved, (v - rest @ free) / w[solved]), jac

    return Quantity(name, lambda theta: float(w @ theta), solved, solve, lambda v: span,
                    lambda v: box[:solved] + box[solved + 1:])


def coordinate(index: int, name: str, terms: int) -> Quantity:
    """theta[index] itself."""
    return linear(name, np.eye(1 + 2 * terms)[index], index)


# ----------------------------------------------------------------------------- the two-term law's optimum
# err(N, D) = E + A N^-alpha + B D^-beta, theta = (e, a, alpha, b, beta), C = c N D, L = log(C / c).
# With N and D centred (over their geometric means), the same formulas hold for the centred
# log N* and L (log C / (c N_mean D_mean)).
# At the compute-optimal N* (alpha A N*^-alpha = beta B D*^-beta):
#   log N* = (log alpha + a - log beta - b + beta L) / (alpha + beta)
#   err*   = E + (1 + alpha / beta) A N*^-alpha


def log_n_opt(theta: np.ndarray, log_c: float) -> float:
    _, a, alpha, b, beta = theta
    return (math.log(alpha) + a - math.log(beta) - b + beta * log_c) / (alpha + beta)


def log_err_opt(theta: np.ndarray, log_c: float) -> float:
    e, a, alpha, _, beta = theta
    return float(np.logaddexp(e, math.log1p(alpha / beta) + a - alpha * log_n_opt(theta, log_c)))


def n_opt_quantity(log_c: float, span: float = math.log(1e6)) -> Quantity:
    """log N_opt at C = c exp(log_c), held by solving b; searched within a factor e^span."""
    box = bounds(2)

    def solve(free: np.ndarray, v: float) -> tuple[np.ndarray, np.ndarray]:
        e, a, alpha, beta = free
        b = math.log(alpha) + a - math.log(beta) + beta * log_c - v * (alpha + beta)
        jac = np.zeros((5, 4))
        jac[[0, 1, 2, 4], [0, 1, 2, 3]] = 1.0
        jac[3] = [0.0, 1.0, 1 / alpha - v, -1 / beta + log_c - v]
        return np.array([e, a, alpha, b, beta]), jac

    return Quantity("log_n_opt", lambda theta: log_n_opt(theta, log_c), 3, solve,
                    lambda v: (v - span, v + span), lambda v: [box[0], box[1], box[2], box[4]])


def err_opt_quantity(log_c: float, span: float = math.log(1e3)) -> Quantity:
    """log err* at C = c exp(log_c), held by solving a; E stays below err*."""
    box = bounds(2)

    def solve(free: np.ndarray, v: float) -> tuple[np.ndarray, np.ndarray]:
        e, alpha, b, beta = free
        big_e, target = math.exp(e), math.exp(v)
        w = math.log(target - big_e)  # log of the reducible part, (1 + alpha/beta) A N*^-alpha
        lam = math.log1p(alpha / beta)
        k = math.log(alpha) - math.log(beta) - b + beta * log_c
        a = ((w - lam) * (alpha + beta) + alpha * k) / beta
        jac = np.zeros((5, 4))
        jac[[0, 2, 3, 4], [0, 1, 2, 3]] = 1.0
        jac[1] = [-(alpha + beta) / beta * big_e / (target - big_e), (w - lam + k) / beta, -alpha / beta,
                  ((w - lam) + alpha * log_c - a) / beta]
        return np.array([e, a, alpha, b, beta]), jac

    def free_bounds(v: float) -> list[tuple[float, float]]:
        # E < err*: the reducible part stays positive (log(1 - 1e-6) below the target).
        return [(box[0][0], min(box[0][1], v - 1e-6)), box[2], box[3], box[4]]

    return Quantity("log_err_opt", lambda theta: log_err_opt(theta, log_c), 1, solve,
                    lambda v: (max(v - span, box[0][0] + 1.0), v + span), free_bounds)


def exponent_quantity() -> Quantity:
    """beta / (alpha + beta), the exponent of N_opt(C), held by solving beta."""
    box = bounds(2)

    def solve(free: np.ndarray, v: float) -> tuple[np.ndarray, np.ndarray]:
        e, a, alpha, b = free
        jac = np.zeros((5, 4))
        jac[[0, 1, 2, 3], [0, 1, 2, 3]] = 1.0
        jac[4, 2] = v / (1 - v)
        return np.array([e, a, alpha, b, v * alpha / (1 - v)]), jac

    return Quantity("exponent", lambda theta: float(theta[4] / (theta[2] + theta[4])), 4, solve,
                    lambda v: (1e-3, 1 - 1e-3), lambda v: box[:4])


# ----------------------------------------------------------------------------- the profile


def lr_threshold(residuals: np.ndarray, n_params: int, level: float, delta: float = HUBER_DELTA) -> float:
    """The rise of the scaled Huber loss that marks the ``level`` interval's ends."""
    dof = len(residuals) - n_params
    if dof < 1:
        raise ValueError(f"{len(residuals)} rows for {n_params} parameters: no residual degrees of freedom")
    sigma = max(float(np.sqrt(np.sum(residuals**2) / dof)), 1e-12)
    t = delta / sigma
    inside = math.erf(t / math.sqrt(2))  # E[psi'] = P(|r| <= delta)
    density = math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    psi2 = sigma**2 * (inside - 2 * t * density) + delta**2 * (1 - inside)  # E[min(r^2, delta^2)]
    per_unit = 2 * delta**2 * inside / psi2  # likelihood-ratio units per unit of the 1/delta^2-scaled loss
    return float(f_dist.ppf(level, 1, dof)) / per_unit


class Profile:
    """Profiles of one fitted law: ``interval(quantity)`` for any quantity of its theta."""

    def __init__(self, logs: np.ndarray, y: np.ndarray, theta: np.ndarray, loss: float, level: float,
                 delta: float = HUBER_DELTA):
        self.logs, self.log_y, self.delta = logs, np.log(y), delta
        self.theta, self.loss = np.asarray(theta, float), float(loss)
        residuals = objective_residuals(self.theta, logs, self.log_y)
        self.threshold = lr_threshold(residuals, len(self.theta), level, delta)
        # Revived amplitudes (E, A_j) start at 5% of the smallest y; per solved index, the
        # free parameters that are amplitudes.
        self.floor = float(self.log_y.min()) - 3.0
        is_amplitude = np.arange(len(self.theta)) % 2 == 0
        is_amplitude = ~is_amplitude
        is_amplitude[0] = True
        self._amplitudes = {k: np.delete(is_amplitude, k) for k in range(len(self.theta))}
        self.fits = 0  # L-BFGS-B runs, for the record

    def _fit_at(self, q: Quantity, v: float, start: np.ndarray) -> tuple[np.ndarray, float]:
        """The best fit with q held at v, from ``start`` (free parameters) and from the same
        start with its vanished terms revived: (free, loss).

        A term whose log amplitude sits near the box's floor has a gradient of ~exp(-20):
        a warm start there never brings it back, even where the profile needs it (E -> 0
        while alpha -> 0 stands in for E, then alpha is held at 0.5)."""
        def f(free):
            theta, jac = q.solve(free, v)
            value, grad = objective(theta, self.logs, self.log_y, self.delta)
            return value, jac.T @ grad

        box = q.free_bounds(v)
        lower, upper = np.array([lo for lo, _ in box]), np.array([hi for _, hi in box])
        start = np.clip(start, lower, upper)
        revived = np.clip(np.where(self._amplitudes[q.solved], np.maximum(start, self.floor), start), lower, upper)
        best = (start, math.inf)
        for x0 in (start, revived) if np.any(revived != start) else (start,):
            self.fits += 1
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=box, options=LBFGS_OPTIONS)
            if np.isfinite(res.fun) and res.fun < best[1]:
                best = (res.x, float(res.fun))
        return best

    def interval(self, q: Quantity) -> Interval:
        v0 = q.value(self.theta)
        lo_limit, hi_limit = q.limits(v0)
        with one_blas_thread():
            ends = [self._side(q, v0, limit) for limit in (lo_limit, hi_limit)]
        return Interval(ends[0][0], ends[1][0], ends[0][1], ends[1][1])

    def _side(self, q: Quantity, v0: float, limit: float) -> tuple[float, bool]:
        """Walk from v0 towards ``limit`` in doubling steps until the loss rises past the
        threshold, then locate the crossing; (end, open)."""
        if abs(limit - v0) < 1e-12:
            return limit, True
        rise = lambda loss: loss - self.loss - self.threshold  # noqa: E731
        inside_v, inside_free, inside_rise = v0, q.free(self.theta), -self.threshold
        step = 0.01 * abs(limit - v0)
        while True:
            v = limit if step >= abs(limit - inside_v) else inside_v + math.copysign(step, limit - v0)
            free, loss = self._fit_at(q, v, inside_free)
            if rise(loss) > 0:
                break
            if v == limit:
                return limit, True
            inside_v, inside_free, inside_rise, step = v, free, rise(loss), 2 * step
        # The bracket's ends are known: a refit there from another start could land elsewhere.
        known = {inside_v: inside_rise, v: rise(loss)}
        crossing = brentq(lambda u: known[u] if u in known else rise(self._fit_at(q, u, inside_free)[1]),
                          inside_v, v, xtol=_XTOL * abs(v - inside_v), rtol=1e-10)
        return float(crossing), False


def objective_residuals(theta: np.ndarray, logs: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """log of the fitted law minus log y, per row."""
    return log_sum_of_powers(theta, logs)[0] - log_y
