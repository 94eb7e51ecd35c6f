import numpy as np
import pytest

from qsm_core.errors import InputError, NotEstimableError
from training.calibration import (
    apply_temperature,
    binary_nll,
    choose_threshold,
    fit_temperature,
    prevalence_weights,
    prior_offset,
    prior_shift,
)


def _toy(rng, n=4000, scale=3.0, shift=0.0):
    """Labels drawn from sigmoid(z_true); reported logits over-confident by ``scale``."""
    z_true = rng.normal(0.0, 2.0, size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z_true))).astype(int)
    return scale * z_true - shift, y, z_true


def test_temperature_recovers_overconfidence_and_reduces_nll(rng):
    z, y, z_true = _toy(rng, scale=3.0)
    t = fit_temperature(z, y)
    assert t == pytest.approx(3.0, rel=0.12)
    nll_before = binary_nll(z, y)
    nll_after = binary_nll(z / t, y)
    assert nll_after < nll_before - 0.05
    assert nll_after == pytest.approx(binary_nll(z_true, y), abs=0.01)
    # ranking unchanged
    p = apply_temperature(z, temperature=t)
    assert np.array_equal(np.argsort(p), np.argsort(z))


def test_underconfident_gives_t_below_one(rng):
    z, y, _ = _toy(rng, scale=0.4)
    assert fit_temperature(z, y) == pytest.approx(0.4, rel=0.15)


def test_prior_offset_undoes_class_weight(rng):
    # a BCE with pos_weight w learns logits shifted by +log(w)
    z, y, z_true = _toy(rng, scale=1.0, shift=-np.log(4.0))
    off = prior_offset(4.0)
    assert off == pytest.approx(-np.log(4.0))
    assert binary_nll(z + off, y) == pytest.approx(binary_nll(z_true, y), abs=1e-12)
    t = fit_temperature(z, y, offset=off)
    assert t == pytest.approx(1.0, rel=0.1)


def test_nll_analytic():
    assert binary_nll([0.0], [1]) == pytest.approx(np.log(2))
    assert binary_nll([100.0], [1]) == pytest.approx(0.0, abs=1e-12)
    assert binary_nll([100.0], [0]) == pytest.approx(100.0)


def test_errors():
    with pytest.raises(NotEstimableError):
        fit_temperature([0.1, 0.2], [1, 1])
    with pytest.raises(InputError):
        fit_temperature([0.1, np.nan], [0, 1])
    with pytest.raises(InputError):
        fit_temperature([0.1, 0.2], [0, 2])
    with pytest.raises(InputError):
        choose_threshold([0.1, 0.9], [0, 1], rule="magic")


def test_choose_threshold_separable_and_kappa():
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    for rule in ("kappa", "youden", "f1"):
        t = choose_threshold(p, y, rule=rule)
        assert 0.3 < t <= 0.6
        assert np.array_equal((p >= t).astype(int), y)
    assert choose_threshold(p, y, rule="half") == 0.5


def test_prior_shift_makes_probabilities_right_for_another_prevalence(rng):
    # score s ~ N(+1, 1) for rims, N(-1, 1) otherwise: the true posterior logit at rim share
    # pi is 2 s + logit(pi), so a model calibrated at 0.3 needs logit(0.1) - logit(0.3)
    # to be calibrated at 0.1
    n = 200_000
    y = (rng.random(n) < 0.1).astype(int)
    s = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    z_train = 2 * s + np.log(0.3 / 0.7)
    shift = prior_shift(0.3, 0.1)
    assert shift == pytest.approx(np.log(0.1 / 0.9) - np.log(0.3 / 0.7))
    p = apply_temperature(z_train, temperature=1.0, shift=shift)
    assert p.mean() == pytest.approx(0.1, abs=0.003)
    assert binary_nll(z_train + shift, y) < binary_nll(z_train, y) - 0.02
    assert prior_shift(0.25, 0.25) == 0.0
    with pytest.raises(InputError, match="target_prevalence"):
        prior_shift(0.3, 1.0)


def test_prevalence_weights_and_weighted_threshold_equal_duplicated_rows(rng):
    y = np.array([1] * 30 + [0] * 70)
    w = prevalence_weights(y, 0.1)
    assert w.sum() == pytest.approx(100.0)
    assert w[y == 1].sum() / w.sum() == pytest.approx(0.1)
    # integer weights count like duplicated lesions
    p = rng.random(100)
    y2 = (rng.random(100) < p).astype(int)
    weights = np.where(y2 == 1, 3.0, 1.0)
    rep = np.repeat(np.arange(100), weights.astype(int))
    for rule in ("kappa", "youden", "f1"):
        assert choose_threshold(p, y2, rule=rule, weights=weights) == pytest.approx(
            choose_threshold(p[rep], y2[rep], rule=rule))
    with pytest.raises(NotEstimableError):
        prevalence_weights([1, 1], 0.1)
    with pytest.raises(InputError, match="weights"):
        choose_threshold(p, y2, weights=-weights)


def test_fewer_rims_raise_the_kappa_threshold(rng):
    n = 20_000
    y = (rng.random(n) < 0.3).astype(int)
    s = rng.normal(np.where(y == 1, 1.5, -1.5), 1.0)
    p = apply_temperature(3 * s + np.log(0.3 / 0.7), temperature=1.0)
    t_train = choose_threshold(p, y)
    shift = prior_shift(0.3, 0.1)
    p_low = apply_temperature(3 * s + np.log(0.3 / 0.7), temperature=1.0, shift=shift)
    t_low = choose_threshold(p_low, y, weights=prevalence_weights(y, 0.1))
    # in score terms the call needs more evidence when rims are rarer
    s_train = s[p >= t_train].min()
    s_low = s[p_low >= t_low].min()
    assert s_low > s_train
