"""Intervals and verdicts on the record's numbers: is a difference between two
methods larger than the noise of the episodes and trials that measured it?

    from experiments import intervals
    found = intervals.bootstrap_difference(returns_a, returns_b)     # (T, K, E) each
    found.difference, found.low, found.high                          # 95 % interval
    intervals.verdict(found, "higher")             # "holds" | "fails" | "inconclusive"

Rewards: the record keeps every episode's return, (trials T, test agents K,
episodes E) per method, so their interval is a nested bootstrap
(`bootstrap_means`): each resample draws T trials with replacement, then, for
each drawn trial and each agent, E of that trial's episodes with replacement;
it averages over episodes and drawn trials per agent, then over the K agents
(the agents are fixed: the claim is about these five test agents). The two
methods are resampled independently (their episodes use different keys), and
the percentile interval of the resampled differences is reported. With one
trial the interval holds episode noise only, not the noise of training
another model; with one episode as well there is nothing to resample and
no interval (`None` bounds, verdict "inconclusive").

Prediction errors: the record keeps per agent the mean and the standard
deviation (ddof 0) of the per-episode RMSE, not the episodes themselves, so
their interval is a normal approximation (`normal_difference`): each agent's
mean has standard error std / √(n − 1) over its n scored episodes (n = the
prediction episodes × trials, episode noise only), the agents' errors add.
The paper's numbers (mean ± std over its 5 trials per agent) get the same
normal interval with standard error std / √5.

Pure numpy and seeded: the same inputs give the same interval.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

NUM_RESAMPLES = 2000
CONFIDENCE = 0.95
OUTCOMES = ("holds", "fails", "inconclusive")


class Interval(NamedTuple):
    """A difference (a − b) of means over agents and its interval.

    Attributes:
      difference: the observed difference of the two means over agents.
      low, high: the interval's bounds; None where nothing measured its noise.
      over: what the interval resamples or assumes, in words.
    """

    difference: float
    low: float | None
    high: float | None
    over: str


def _checked_returns(returns, name: str) -> np.ndarray:
    array = np.asarray(returns, dtype=np.float64)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"{name}: expected returns of shape (trials, agents, episodes), "
                         f"got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: returns must be finite")
    return array


def bootstrap_means(returns, num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Resampled means over agents of `returns` (T, K, E): trials drawn with
    replacement, then each drawn trial's episodes with replacement, per agent.

    Args:
      returns: (T, K, E) episode returns.
      num_resamples: R, how many resamples.
      rng: the numpy generator that draws them.

    Returns:
      (R,) means over the K agents of each agent's mean over the drawn trials'
      drawn episodes.
    """
    returns = _checked_returns(returns, "returns")
    trials, agents, episodes = returns.shape
    drawn_trials = rng.integers(0, trials, size=(num_resamples, trials))
    drawn_episodes = rng.integers(0, episodes, size=(num_resamples, trials, agents, episodes))
    picked = returns[drawn_trials[:, :, None, None], np.arange(agents)[None, None, :, None],
                     drawn_episodes]                                    # (R, T, K, E)
    return picked.mean(axis=(1, 3)).mean(axis=1)


def bootstrap_difference(returns_a, returns_b, *, num_resamples: int = NUM_RESAMPLES,
                         seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """The difference of the means over agents of `returns_a` and `returns_b`
    ((T, K, E) each; T and E may differ between them, K may not) with its
    bootstrap percentile interval (`bootstrap_means`, the two resampled
    independently). No interval (None bounds) when neither has more than one
    trial or episode to resample."""
    a, b = _checked_returns(returns_a, "returns_a"), _checked_returns(returns_b, "returns_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"returns_a has {a.shape[1]} agents, returns_b {b.shape[1]}; "
                         "compare the same test agents")
    difference = float(a.mean(axis=(0, 2)).mean() - b.mean(axis=(0, 2)).mean())
    over = _resampled(a, b)
    if max(a.shape[0], a.shape[2]) == 1 or max(b.shape[0], b.shape[2]) == 1:
        return Interval(difference, None, None, over)
    rng = np.random.default_rng(seed)
    resampled = bootstrap_means(a, num_resamples, rng) - bootstrap_means(b, num_resamples, rng)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Interval(difference, float(low), float(high), over)


def _resampled(a: np.ndarray, b: np.ndarray) -> str:
    def one(x):
        return f"{x.shape[0]} trial{'s' if x.shape[0] > 1 else ''} × {x.shape[2]} episode" + (
            "s" if x.shape[2] > 1 else "")
    sizes = one(a) if (a.shape[0], a.shape[2]) == (b.shape[0], b.shape[2]) else \
        f"{one(a)} vs {one(b)}"
    if max(a.shape[0], a.shape[2]) == 1 or max(b.shape[0], b.shape[2]) == 1:
        return f"{sizes} per agent: no noise to resample"
    what = "trials and episodes" if max(a.shape[0], b.shape[0]) > 1 else \
        "episodes (one trial: no training noise)"
    return f"bootstrap over {what}; {sizes} per agent"


def normal_difference(mean_a, se_a, mean_b, se_b, *, over: str,
                      confidence: float = CONFIDENCE) -> Interval:
    """The difference of the means over agents of `mean_a` and `mean_b` ((K,)
    each), with the normal interval from the agents' standard errors `se_a`,
    `se_b` ((K,) each; independent agents and methods). None bounds where a
    standard error is not a finite number."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (mean_a, se_a, mean_b, se_b)]
    if len({x.shape for x in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"mean_a, se_a, mean_b, se_b: expected four (K,) arrays, got shapes "
                         f"{[x.shape for x in arrays]}")
    mean_a, se_a, mean_b, se_b = arrays
    difference = float(mean_a.mean() - mean_b.mean())
    if not (np.all(np.isfinite(se_a)) and np.all(np.isfinite(se_b))) or not math.isfinite(
            difference):
        return Interval(difference, None, None, over)
    se = float(np.sqrt(np.sum(se_a ** 2 + se_b ** 2))) / len(mean_a)
    z = normal_quantile(0.5 + confidence / 2)
    return Interval(difference, difference - z * se, difference + z * se, over)


def normal_quantile(p: float) -> float:
    """The standard normal's p-quantile (bisection on erf: no scipy needed)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        middle = (low + high) / 2
        if 0.5 * (1 + math.erf(middle / math.sqrt(2))) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def verdict(interval: Interval, direction: str, margin: float = 0.0) -> str:
    """Whether a claim on `interval` (a − b) holds: "higher" (a − b > −margin)
    or "lower" (a − b < margin) for the whole interval ("holds"), for none of
    it ("fails"), or the interval covers the boundary or is missing
    ("inconclusive")."""
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction: must be 'higher' or 'lower', got {direction!r}")
    if interval.low is None or interval.high is None:
        return "inconclusive"
    if direction == "higher":
        low, high = interval.low + margin, interval.high + margin
    else:
        low, high = -(interval.high - margin), -(interval.low - margin)
    if low > 0:
        return "holds"
    if high < 0:
        return "fails"
    return "inconclusive"
