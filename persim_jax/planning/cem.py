"""The cross-entropy method for continuous actions in a box: truncated-normal
samples, elites, 1 + R rounds with smoothing; play the mean first action of
the last round's elites; warm start from the shifted smoothed mean."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from persim_jax.planning.base import Planner
from persim_jax.planning.objective import ObjectiveConfig, check_positive, score_sequences
from persim_jax.types import RewardFn, TerminatedFn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CEMConfig(ObjectiveConfig):
    """Cross-entropy method for continuous actions in a box (docs/design.md).

    Attributes:
      action_dim: A.
      num_samples: sequences sampled per round (200).
      horizon: steps per sequence (30).
      num_elites: best sequences kept per round (50).
      num_rounds: refinement rounds after the first one (5: 1 + 5 rounds).
      smoothing: weight of the previous mean and std in a refinement round:
        μ ← smoothing·μ + (1 − smoothing)·μ_elite (0.1), likewise σ. The first
        round replaces them by the elite mean and std.
      init_std_low, init_std_high: the first round's σ is one scalar drawn
        uniformly from [low, high) at every plan (authors: [0.3, 0.6)).
      action_low, action_high: the action box; samples are truncated normal
        in it.
      min_std: floor of σ when sampling (keeps a collapsed σ finite).
      discount, aggregation, propagation, position_bonus, position_index,
        rollout_chunk, shard_candidates: the objective (`ObjectiveConfig`).
    """

    action_dim: int
    num_samples: int = 200
    horizon: int = 30
    num_elites: int = 50
    num_rounds: int = 5
    smoothing: float = 0.1
    init_std_low: float = 0.3
    init_std_high: float = 0.6
    action_low: float = -1.0
    action_high: float = 1.0
    min_std: float = 1e-6

    def __post_init__(self):
        check_positive(self, "action_dim", "num_samples", "num_elites")
        super().__post_init__()
        if not 2 <= self.num_elites <= self.num_samples:
            raise ValueError(f"num_elites: must be in [2, num_samples={self.num_samples}] (the "
                             f"elite std needs two); got {self.num_elites!r}")
        if not isinstance(self.num_rounds, (int, np.integer)) or self.num_rounds < 0:
            raise ValueError(f"num_rounds: must be an integer >= 0; got {self.num_rounds!r}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing: must be in [0, 1); got {self.smoothing!r}")
        if not 0.0 < self.init_std_low <= self.init_std_high:
            raise ValueError(f"init_std_low, init_std_high: need 0 < low <= high; got "
                             f"{self.init_std_low!r}, {self.init_std_high!r}")
        if not self.action_low < self.action_high:
            raise ValueError(f"action_low, action_high: need low < high; got "
                             f"{self.action_low!r}, {self.action_high!r}")
        if not self.min_std > 0.0:
            raise ValueError(f"min_std: must be > 0; got {self.min_std!r}")


class CEMState(NamedTuple):
    """Warm start of CEM: mean (H, A) of the next plan's first round."""

    mean: Array


def cem(config: CEMConfig, reward_fn: RewardFn,
        terminated_fn: TerminatedFn | None = None) -> Planner:
    """Cross-entropy-method MPC for continuous actions in a box.

    Round 0 samples around the warm-start mean with one scalar σ0 ~
    U[init_std_low, init_std_high) and sets (μ, σ) to the elites' mean and
    (unbiased) std; each of the `num_rounds` refinements samples from (μ, σ)
    and smooths: μ ← s·μ + (1 − s)·μ_elite, σ likewise. Samples are truncated
    normal in [action_low, action_high]. It plays the mean first action of the
    last round's elites; the next plan starts from μ shifted by one step (a
    zero appended).
    """
    if not isinstance(config, CEMConfig):
        raise ValueError(f"config: expected a CEMConfig, got {type(config).__name__}")
    shape = (config.horizon, config.action_dim)
    low, high = config.action_low, config.action_high
    smooth = config.smoothing

    def init() -> CEMState:
        return CEMState(jnp.zeros(shape, jnp.float32))

    def plan(key, state: CEMState, obs, dynamics):
        sequence, state = plan_sequence(key, state, obs, dynamics)
        return sequence[0], state

    def plan_sequence(key, state: CEMState, obs, dynamics):
        """(the last round's elite mean (H, A), whose first action is played; state)."""
        std_key, *round_keys = jax.random.split(key, config.num_rounds + 2)

        def elites(key, mean, std):
            """Elite mean (H, A) and std (H, A)."""
            std = jnp.maximum(std, config.min_std)
            z = jax.random.truncated_normal(key, (low - mean) / std, (high - mean) / std,
                                            (config.num_samples, *shape), jnp.float32)
            samples = jnp.clip(mean + std * z, low, high)
            scores = score_sequences(dynamics, reward_fn, terminated_fn, obs, samples, config)
            _, index = jax.lax.top_k(scores, config.num_elites)
            elite = samples[index]
            return jnp.mean(elite, 0), jnp.std(elite, 0, ddof=1)

        std0 = jax.random.uniform(std_key, (), jnp.float32, config.init_std_low,
                                  config.init_std_high)
        mean, std = elites(round_keys[0], state.mean, jnp.full(shape, std0))
        played = mean

        def refine(carry, key):
            mean, std, _ = carry
            elite_mean, elite_std = elites(key, mean, std)
            return (smooth * mean + (1 - smooth) * elite_mean,
                    smooth * std + (1 - smooth) * elite_std, elite_mean), None

        if config.num_rounds:
            (mean, std, played), _ = jax.lax.scan(
                refine, (mean, std, played), jnp.stack(round_keys[1:]))
        next_mean = jnp.concatenate([mean[1:], jnp.zeros((1, config.action_dim), mean.dtype)])
        # Belt and braces: samples are finite, so their mean is; never play NaN.
        played = jnp.clip(jnp.nan_to_num(played), low, high)
        return played, CEMState(next_mean)

    return Planner(init, plan, config, plan_sequence)
