"""The record's intervals (`experiments.intervals`): the nested bootstrap of
episode returns, the normal interval of mean errors, and the verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import intervals


def _returns(mean, spread, trials=3, agents=5, episodes=20, seed=0):
    rng = np.random.default_rng(seed)
    return mean + spread * rng.standard_normal((trials, agents, episodes))


def test_a_large_difference_holds_and_its_mirror_fails():
    better, worse = _returns(100.0, 5.0), _returns(50.0, 5.0, seed=1)
    found = intervals.bootstrap_difference(better, worse)
    assert found.low < found.difference < found.high
    assert 40.0 < found.low and found.high < 60.0
    assert intervals.verdict(found, "higher") == "holds"
    assert intervals.verdict(found, "lower") == "fails"
    mirror = intervals.bootstrap_difference(worse, better)
    assert intervals.verdict(mirror, "higher") == "fails"


def test_identical_distributions_are_inconclusive():
    a, b = _returns(0.0, 10.0, seed=2), _returns(0.0, 10.0, seed=3)
    found = intervals.bootstrap_difference(a, b)
    assert found.low < 0.0 < found.high
    assert intervals.verdict(found, "higher") == "inconclusive"
    assert intervals.verdict(found, "lower") == "inconclusive"


def test_the_interval_is_seeded_and_narrows_with_more_episodes():
    a, b = _returns(1.0, 10.0, episodes=10, seed=4), _returns(0.0, 10.0, episodes=10, seed=5)
    assert intervals.bootstrap_difference(a, b) == intervals.bootstrap_difference(a, b)
    wide = intervals.bootstrap_difference(a, b)
    many_a = _returns(1.0, 10.0, episodes=1000, seed=4)
    many_b = _returns(0.0, 10.0, episodes=1000, seed=5)
    narrow = intervals.bootstrap_difference(many_a, many_b)
    assert narrow.high - narrow.low < 0.3 * (wide.high - wide.low)


def test_trials_are_resampled_not_only_episodes():
    # Two trials far apart, no episode noise: a bootstrap over episodes alone
    # would give a zero-width interval; resampling the trials does not.
    a = np.concatenate([np.zeros((1, 5, 10)), np.full((1, 5, 10), 10.0)])
    b = np.full((2, 5, 10), 5.0)
    found = intervals.bootstrap_difference(a, b)
    assert found.difference == 0.0
    assert found.low <= -4.9 and found.high >= 4.9
    assert "trials and episodes" in found.over
    # The means resampled: each the mean over agents of 0, 5 or 10 (trial draws).
    means = intervals.bootstrap_means(a, 200, np.random.default_rng(0))
    assert set(np.round(means, 6)) <= {0.0, 5.0, 10.0}


def test_one_episode_of_one_trial_has_no_interval():
    found = intervals.bootstrap_difference(np.ones((1, 5, 1)), np.zeros((1, 5, 1)))
    assert found.difference == 1.0 and found.low is None and found.high is None
    assert "no noise to resample" in found.over
    assert intervals.verdict(found, "higher") == "inconclusive"


def test_a_margin_shifts_the_boundary():
    found = intervals.Interval(-3.0, -4.0, -2.0, "")
    assert intervals.verdict(found, "higher") == "fails"
    assert intervals.verdict(found, "higher", margin=5.0) == "holds"
    assert intervals.verdict(found, "higher", margin=3.0) == "inconclusive"
    assert intervals.verdict(found, "lower") == "holds"
    assert intervals.verdict(found, "lower", margin=-5.0) == "fails"


def test_normal_interval_of_mean_errors():
    found = intervals.normal_difference([1.0, 1.0], [0.1, 0.1], [2.0, 2.0], [0.1, 0.1],
                                        over="test")
    # se = sqrt(4 * 0.01) / 2 = 0.1; 1.96 of them on either side of -1.
    assert found.difference == -1.0
    assert found.low == pytest.approx(-1.196, abs=1e-3)
    assert found.high == pytest.approx(-0.804, abs=1e-3)
    assert intervals.verdict(found, "lower") == "holds"
    close = intervals.normal_difference([1.0], [0.5], [1.1], [0.5], over="test")
    assert intervals.verdict(close, "lower") == "inconclusive"
    missing = intervals.normal_difference([1.0], [float("nan")], [2.0], [0.1], over="test")
    assert missing.low is None


def test_prediction_claims_resample_per_episode_errors_when_recorded():
    from experiments import claims

    def row(level, with_episodes=True):
        errors = _returns(level, 0.01, trials=1, agents=5, episodes=10)
        out = {"rmse": errors.mean(axis=(0, 2)).tolist(), "rmse_std": errors.std(axis=2)[0].tolist(),
               "episodes": 10, "trials": 1}
        if with_episodes:
            out["rmse_episodes"] = errors.tolist()
        return out

    ours, theirs = row(0.10), row(0.20)
    found = claims._prediction_interval(ours, theirs)
    assert "bootstrap" in found.over and found.high < 0          # lower, beyond the noise
    assert found.difference == pytest.approx(np.mean(ours["rmse"]) - np.mean(theirs["rmse"]))
    assert intervals.verdict(found, "lower") == "holds"
    # An older record without per-episode errors, or with an unscored episode:
    # the normal interval from each agent's std.
    assert "normal" in claims._prediction_interval(ours, row(0.20, False)).over
    theirs["rmse_episodes"][0][0][0] = None
    assert "normal" in claims._prediction_interval(ours, theirs).over


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="returns_a"):
        intervals.bootstrap_difference(np.ones((5, 3)), np.ones((1, 5, 3)))
    with pytest.raises(ValueError, match="agents"):
        intervals.bootstrap_difference(np.ones((1, 5, 3)), np.ones((1, 4, 3)))
    with pytest.raises(ValueError, match="direction"):
        intervals.verdict(intervals.Interval(0.0, -1.0, 1.0, ""), "sideways")
