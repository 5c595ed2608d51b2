"""Random shooting for discrete actions: uniform candidate sequences,
candidate 0 the previous best plan shifted by one step; play the first action
of the best candidate."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from persim_jax.planning.base import Planner
from persim_jax.planning.objective import ObjectiveConfig, check_positive, score_sequences
from persim_jax.types import RewardFn, TerminatedFn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RandomShootingConfig(ObjectiveConfig):
    """Random shooting for discrete actions (docs/design.md, decisions table).

    Attributes:
      num_actions: number of discrete actions; candidates are uniform on
        {0, ..., num_actions - 1} at every step.
      num_candidates: candidate sequences per plan (1000).
      horizon: steps per sequence.
      warm_start: replace candidate 0 by the previous best plan shifted.
      discount, aggregation, propagation, position_bonus, position_index,
        rollout_chunk, shard_candidates: the objective (`ObjectiveConfig`).
    """

    num_actions: int
    num_candidates: int = 1000
    horizon: int = 30
    warm_start: bool = True

    def __post_init__(self):
        check_positive(self, "num_actions", "num_candidates")
        super().__post_init__()


class RandomShootingState(NamedTuple):
    """Warm start of random shooting.

    Attributes:
      previous_plan: (H,) int32 best sequence of the last plan.
      has_previous: () bool, False at the start of an episode.
    """

    previous_plan: Array
    has_previous: Array


def random_shooting(config: RandomShootingConfig, reward_fn: RewardFn,
                    terminated_fn: TerminatedFn | None = None) -> Planner:
    """Random-shooting MPC for discrete actions.

    Every plan draws `num_candidates` uniform sequences of `horizon` actions;
    with a warm start, candidate 0 is the previous best sequence shifted left
    by one (its last action stays the random one). It plays the first action
    of the best-scoring candidate and keeps that candidate as the next warm
    start.
    """
    if not isinstance(config, RandomShootingConfig):
        raise ValueError(f"config: expected a RandomShootingConfig, got {type(config).__name__}")

    def init() -> RandomShootingState:
        return RandomShootingState(jnp.zeros((config.horizon,), jnp.int32), jnp.array(False))

    def plan(key, state: RandomShootingState, obs, dynamics):
        best, state = plan_sequence(key, state, obs, dynamics)
        return best[0], state

    def plan_sequence(key, state: RandomShootingState, obs, dynamics):
        """(the best candidate (H,), whose first action is played; state)."""
        candidates = jax.random.randint(
            key, (config.num_candidates, config.horizon), 0, config.num_actions, jnp.int32)
        if config.warm_start:
            shifted = jnp.concatenate([state.previous_plan[1:], candidates[0, -1:]])
            candidates = candidates.at[0].set(
                jnp.where(state.has_previous, shifted, candidates[0]))
        scores = score_sequences(dynamics, reward_fn, terminated_fn, obs, candidates, config,
                                 num_actions=config.num_actions)
        best = candidates[jnp.argmax(scores)]
        return best, RandomShootingState(best, jnp.array(True))

    return Planner(init, plan, config, plan_sequence)
