"""The profile's held quantities: solving one parameter keeps the quantity at v, and the
hand-derived Jacobians match finite differences (an error there would bend every interval)."""

import numpy as np
import pytest

from scalejepa.sweep import profile


@pytest.mark.parametrize("make", [
    lambda: profile.coordinate(2, "alpha", 2),
    lambda: profile.linear("log A", [0, 1, 3.7, 0, 0], 1),
    lambda: profile.n_opt_quantity(log_c=2.5),
    lambda: profile.err_opt_quantity(log_c=2.5),
    lambda: profile.exponent_quantity(),
])
def test_solve_holds_the_quantity_and_its_jacobian_is_exact(make):
    q = make()
    rng = np.random.default_rng(0)
    for _ in range(5):
        theta = np.array([rng.uniform(-4, -2), rng.uniform(-3, 0), rng.uniform(0.2, 1.0), rng.uniform(-3, 0),
                          rng.uniform(0.2, 1.0)])
        v = q.value(theta)
        solved, jac = q.solve(q.free(theta), v)
        np.testing.assert_allclose(solved, theta, rtol=1e-10, atol=1e-10)  # solving recovers theta itself
        free = q.free(theta)
        for k in range(len(free)):
            step = np.zeros_like(free)
            step[k] = 1e-6
            numeric = (q.solve(free + step, v)[0] - q.solve(free - step, v)[0]) / 2e-6
            np.testing.assert_allclose(jac[:, k], numeric, rtol=1e-5, atol=1e-7)


def test_threshold_matches_the_f_quantile_for_gaussian_huber_limits():
    # Huber delta far above the noise is least squares: the loss rise at the interval's end
    # is F(1, n - p) * sigma^2 / 2 (in units of the 1/delta^2-scaled loss).
    from scipy.stats import f as f_dist

    r = np.random.default_rng(1).normal(0, 0.01, 40)
    sigma2 = np.sum(r**2) / 35
    assert profile.lr_threshold(r, 5, 0.8, delta=10.0) == pytest.approx(f_dist.ppf(0.8, 1, 35) * sigma2 / 2 / 100, rel=1e-3)
    # Delta far below the noise is least absolute deviations: sqrt(2 pi) sigma / 4 per unit of sum |r| / delta.
    assert profile.lr_threshold(r, 5, 0.8, delta=1e-6) == pytest.approx(
        f_dist.ppf(0.8, 1, 35) * np.sqrt(2 * np.pi * sigma2) / 4 / 1e-6, rel=1e-3)
