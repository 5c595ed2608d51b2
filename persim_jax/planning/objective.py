"""The planners' objective: discounted returns of action sequences under
every ensemble member, combined over the members by a risk strategy.

For candidate sequence a_0..a_{H-1} and member m, ŝ_0 = s,
ŝ_{t+1} = f_m(ŝ_t, a_t), and

    J_m = Σ_t γ^t R(ŝ_t, a_t, ŝ_{t+1}) · alive_t  (+ position shaping)
    J   = min_m J_m   (default, paper)   or   mean_m J_m   (authors' code)

where alive_t is 0 from the first predicted termination on: the transition that
first reaches a terminal state already earns nothing (authors' code, so a
predicted failure inside the horizon costs its step). A rollout whose state
becomes NaN or ±inf while alive scores −inf and never wins.

`ObjectiveConfig` holds the objective's fields that every planner config
shares (they inherit it); `score_sequences` scores under a config,
`member_returns` gives the (M, B) returns before the combination.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from persim_jax.planning import rollout
from persim_jax.types import Dynamics, RewardFn, TerminatedFn
from persim_jax.validation import positive_int

Array = jax.Array

PROPAGATIONS = ("members", "ensemble_mean")


# ---------------------------------------------------------------------------
# Risk strategies: how the members' returns combine (hydrax's `RiskStrategy`,
# for returns rather than costs)


class WorstCase(NamedTuple):
    """The pessimistic score of the paper: the lowest member return."""

    def combine(self, returns: Array) -> Array:
        """(B,) scores from (M, B) member returns."""
        return jnp.min(returns, axis=0)


class Average(NamedTuple):
    """The authors' final code: the mean member return."""

    def combine(self, returns: Array) -> Array:
        """(B,) scores from (M, B) member returns."""
        return jnp.mean(returns, axis=0)


# `aggregation` name -> its risk strategy.
RISK_STRATEGIES = {"min": WorstCase(), "mean": Average()}
AGGREGATIONS = tuple(RISK_STRATEGIES)


def aggregate(returns: Array, aggregation: str = "min") -> Array:
    """(B,) scores from (M, B) member returns: min (paper) or mean over M."""
    if aggregation not in RISK_STRATEGIES:
        raise ValueError(f"aggregation: must be one of {AGGREGATIONS}; got {aggregation!r}")
    return RISK_STRATEGIES[aggregation].combine(returns)


# ---------------------------------------------------------------------------
# The fields every planner config shares


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """The objective's fields, inherited by every planner config (keyword
    only: they follow each planner's own fields in its constructor).

    Attributes:
      discount: γ of the score (paper 0.93; the authors' final code 1.0).
      aggregation: "min" over ensemble members (paper) or "mean" (authors'
        final code); see `RISK_STRATEGIES`.
      propagation: "members" (each member rolls out its own states) or
        "ensemble_mean" (every member is fed the ensemble-mean state, as the
        authors' CEM for continuous actions).
      position_bonus: weight of the shaping bonus max_τ ŝ_τ[position_index]
        added at every step (0 turns it off; the per-env values are in the
        registry, `experiments.paper.PLANNERS`).
      position_index: which state coordinate the bonus maximises.
      rollout_chunk: candidates rolled out at once (`lax.map` over chunks
        after the shared prefix steps); None: all; "auto": at most
        `rollout.CPU_ROLLOUT_CHUNK` on a CPU backend, all on accelerators.
        Speed and memory only: the scores are the same.
      shard_candidates: with more than one local device, split the
        candidates' rollouts over all of them (`shard_map`, one shard per
        device, chunked within it by `rollout_chunk`), unless the plan runs
        inside an already sharded region such as `evaluation.run_episodes`,
        which shards whole episodes instead. On a CPU made of one device per
        core (`persim_jax.use_cpu_cores`) this is what lets one plan use
        every core. Speed only: the scores are the same. Set it False to
        keep a plan on one device (e.g. when its inputs are committed to
        that device).

    A subclass has a `horizon` field (steps per sequence).
    """

    discount: float = 0.93
    aggregation: str = "min"
    propagation: str = "members"
    position_bonus: float = 0.0
    position_index: int = 0
    rollout_chunk: int | str | None = "auto"
    shard_candidates: bool = True

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: must be one of {AGGREGATIONS}; got "
                             f"{self.aggregation!r}")
        if self.propagation not in PROPAGATIONS:
            raise ValueError(f"propagation: must be one of {PROPAGATIONS}; got "
                             f"{self.propagation!r}")
        if not (0.0 < self.discount <= 1.0):
            raise ValueError(f"discount: must be in (0, 1]; got {self.discount!r}")
        if not (math.isfinite(self.position_bonus) and self.position_bonus >= 0.0):
            raise ValueError(f"position_bonus: must be a finite number >= 0; got "
                             f"{self.position_bonus!r}")
        check_positive(self, "horizon")
        if self.rollout_chunk not in (None, "auto"):
            check_positive(self, "rollout_chunk")
        if not isinstance(self.shard_candidates, (bool, np.bool_)):
            raise ValueError(f"shard_candidates: must be True or False; got "
                             f"{self.shard_candidates!r}")


def check_positive(config, *names) -> None:
    """ValueError naming the first of `names` that is not a positive integer."""
    for name in names:
        positive_int(name, getattr(config, name))


# ---------------------------------------------------------------------------
# Scores


def score_sequences(dynamics: Dynamics, reward_fn: RewardFn, terminated_fn: TerminatedFn | None,
                    obs: Array, actions: Array, config: ObjectiveConfig, *,
                    num_actions: int | None = None) -> Array:
    """(B,) scores of (B, H[, A]) sequences from obs (D,) under `config`'s
    objective (discount, propagation, shaping, aggregation); −inf never wins."""
    returns = member_returns(
        dynamics, reward_fn, terminated_fn, obs, actions, discount=config.discount,
        propagation=config.propagation, position_bonus=config.position_bonus,
        position_index=config.position_index, num_actions=num_actions,
        rollout_chunk=config.rollout_chunk, shard_candidates=config.shard_candidates)
    scores = aggregate(returns, config.aggregation)
    return jnp.where(jnp.isnan(scores), -jnp.inf, scores)


def shared_prefix_depth(num_actions: int | None, num_sequences: int, horizon: int) -> int:
    """How many leading steps `member_returns` computes on the tree of distinct
    action prefixes: the largest L <= horizon with num_actions^L < num_sequences
    (0 for continuous actions)."""
    if num_actions is None or num_actions < 2:
        return 0
    depth = 0
    while depth < horizon and num_actions ** (depth + 1) < num_sequences:
        depth += 1
    return depth


class ReturnAccumulator(NamedTuple):
    """What `member_returns` carries per member and candidate, (M, B) each.

    The discount weight γ^t is carried beside it: it is the same for every
    candidate, so it is not split with them into chunks and shards.

    Attributes:
      alive: bool, no termination predicted yet.
      finite: bool, every state predicted while alive was finite.
      total: float32, the discounted return so far.
      best: float32, max_τ ŝ_τ[position_index] so far (the shaping bonus;
        left at ŝ_0's when there is no bonus).
    """

    alive: Array
    finite: Array
    total: Array
    best: Array


def member_returns(
    dynamics: Dynamics,
    reward_fn: RewardFn,
    terminated_fn: TerminatedFn | None,
    obs: Array,
    actions: Array,
    *,
    discount: float = 0.93,
    propagation: str = "members",
    position_bonus: float = 0.0,
    position_index: int = 0,
    num_actions: int | None = None,
    rollout_chunk: int | str | None = None,
    shard_candidates: bool = False,
) -> Array:
    """Discounted returns of B action sequences under each of the M members.

    Args:
      dynamics: a `persim_jax.types.Dynamics` (deterministic).
      reward_fn: R(obs, action, next_obs) broadcasting over leading axes.
      terminated_fn: termination of next_obs (leading axes), or None.
      obs: (D,) the current state ŝ_0.
      actions: (B, H) int or (B, H, A) float candidate sequences.
      discount: γ.
      propagation: "members" or "ensemble_mean" (see `ObjectiveConfig`).
      position_bonus: shaping weight w: adds w · H · max_τ ŝ_τ[position_index]
        (w per step; τ from 0 to the terminal state; not masked, not
        discounted, as the authors' code).
      position_index: the coordinate of the bonus.
      num_actions: for discrete actions, the number of actions. All
        candidates start from ŝ_0, so their first L steps
        (`shared_prefix_depth`) take only num_actions + num_actions² + ... +
        num_actions^L distinct transitions: those are computed once each, on
        the tree of action prefixes, instead of L · B times (2 actions,
        1000 × 30: 1022 instead of 9000 transitions). Same result.
      rollout_chunk: roll the remaining steps out for this many candidates at
        a time (None: all; "auto": see `ObjectiveConfig`).
      shard_candidates: split the candidates over all local devices (see
        `ObjectiveConfig`).

    Returns:
      (M, B) returns J_m; −inf where the rollout blew up (NaN/inf state while
      alive) or its return is not finite.
    """
    obs = jnp.asarray(obs, jnp.float32)
    actions = jnp.asarray(actions)
    num_sequences, horizon = actions.shape[:2]
    steps = jnp.swapaxes(actions, 0, 1)                                  # (H, B, ...)
    depth = shared_prefix_depth(num_actions, num_sequences, horizon)
    feed = functools.partial(propagate, propagation=propagation)
    accumulate = functools.partial(
        accumulate_step, reward_fn=reward_fn, terminated_fn=terminated_fn, discount=discount,
        position_bonus=position_bonus, position_index=position_index)

    prefix, depth = rollout.prefix_transitions(dynamics, feed, obs, steps, num_actions, depth)
    shape = prefix[2].shape[1:3]                                         # (M, B)
    first_state = jnp.broadcast_to(obs, (*shape, obs.shape[-1]))
    start = ReturnAccumulator(jnp.ones(shape, bool), jnp.ones(shape, bool),
                              jnp.zeros(shape, jnp.float32),
                              jnp.broadcast_to(first_state[..., position_index], shape))
    (accumulated, weight), _ = jax.lax.scan(lambda c, x: (accumulate(c, x), None),
                                            (start, jnp.float32(1.0)), prefix)

    rollout_fn = functools.partial(rollout.rollout, dynamics, feed, accumulate)
    rest = (feed(prefix[2][-1]), accumulated, steps[depth:])             # candidates on axis 1
    finite, total, best = rollout.rollout_candidates(
        rollout_fn, rest, weight, rollout_chunk=rollout_chunk, shard_candidates=shard_candidates)
    if position_bonus:
        total = total + position_bonus * horizon * best
    ok = finite & jnp.isfinite(total)
    return jnp.where(ok, total, -jnp.inf)


def propagate(predicted: Array, propagation: str) -> Array:
    """The states (M, B, D) the next step starts from: each member's own
    prediction, or the ensemble mean for every member."""
    if propagation == "members":
        return predicted
    return jnp.broadcast_to(jnp.mean(predicted, axis=0), predicted.shape)


def accumulate_step(carry, transition, *, reward_fn, terminated_fn, discount, position_bonus,
                    position_index):
    """Adds one step of every member and candidate.

    Args:
      carry: (`ReturnAccumulator` (M, B), weight () γ^t of this step).
      transition: state (M, B, D), action (B,) / (B, A), next_state (M, B, D).

    Returns:
      the next carry.
    """
    accumulated, weight = carry
    alive, finite, total, best = accumulated
    state, action, next_state = transition
    action_m = jnp.broadcast_to(action, (next_state.shape[0], *action.shape))
    reward = reward_fn(state, action_m, next_state)
    finite = finite & (jnp.all(jnp.isfinite(next_state), axis=-1) | ~alive)
    ended = (terminated_fn(next_state) if terminated_fn is not None
             else jnp.zeros(next_state.shape[:-1], bool))
    # The step that first reaches a terminal state is masked too (authors).
    counted = alive & ~ended
    total = total + weight * jnp.where(counted, reward, 0.0)
    if position_bonus:
        best = jnp.where(alive, jnp.maximum(best, next_state[..., position_index]), best)
    return ReturnAccumulator(counted, finite, total, best), weight * discount
