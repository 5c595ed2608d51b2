"""Model-predictive control over an ensemble of dynamics (paper, section 5; D.1).

Two planners in the optax style: a frozen config dataclass, and a `Planner`
of two pure functions,

    planner = planning.random_shooting(config, env.reward, env.terminated)
    state = planner.init()                                   # warm start, empty
    action, state = planner.plan(key, state, obs, dynamics)  # one MPC step

(`make_planner(planner_config(env, **fields), env)` builds the planner that
fits the env's actions; the paper's settings per env are
`experiments.paper.planner(env)`.)

* Random shooting (discrete actions): uniform candidate sequences, candidate 0
  is the previous best plan shifted by one step; play the first action of the
  best candidate.
* CEM (continuous actions in a box): truncated-normal samples, elites, 1 + R
  rounds with smoothing; play the mean first action of the last round's
  elites; warm start from the shifted smoothed mean.

Planners only see a dynamics callable and the environment's known reward and
termination, so the same code plans on a learned `Simulator` (M = 5 members,
`simulator_dynamics`) and on the true environment with one agent's physics
(M = 1, `env_dynamics`, the paper's "True env + MPC" row).

The dynamics contract: `dynamics(obs, action) -> (M, B, D)` next states, with
  * obs (B, D): every member predicts from the same states;
  * obs (M, B, D): member m predicts from its own states obs[m];
  * action (B,) int or (B, A) float.
The second form is what lets each member propagate its own trajectory, which
the pessimistic (min over members) score of the paper needs.

Scores (`member_returns`, `score_sequences`): for candidate sequence a_0..a_{H-1}
and member m, ŝ_0 = s, ŝ_{t+1} = f_m(ŝ_t, a_t), and

    J_m = Σ_t γ^t R(ŝ_t, a_t, ŝ_{t+1}) · alive_t  (+ position shaping)
    J   = min_m J_m   (default, paper)   or   mean_m J_m   (authors' code)

where alive_t is 0 from the first predicted termination on: the transition that
first reaches a terminal state already earns nothing (authors' code, so a
predicted failure inside the horizon costs its step). A rollout whose state
becomes NaN or ±inf while alive scores −inf and never wins; the played action
is always finite.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from persim_jax import model
from persim_jax._validate import positive_int

Array = jax.Array
Dynamics = Callable[[Array, Array], Array]
RewardFn = Callable[[Array, Array, Array], Array]
TerminatedFn = Callable[[Array], Array]

AGGREGATIONS = ("min", "mean")
PROPAGATIONS = ("members", "ensemble_mean")

# On a CPU, roll out at most this many candidates at once (`rollout_chunk="auto"`):
# with M = 5 members and 256-wide layers one chunk's activations (~1.3 MB) stay
# in the core's cache for the whole step. With one device per core
# (`persim_jax.use_cpu_cores`, 2 cores) each device's 500 of random shooting's
# 1000 candidates run as 2 chunks of 250: the rollouts of the paper's 4-state,
# 2-action model (benchmarks/mpc_throughput.py) take 3.5 ms, against
# 4.7 ms for 500 at once and 3.6 ms for 4 chunks of 125. CEM's 200 samples stay
# one batch (smaller matmuls would be slower there).
CPU_ROLLOUT_CHUNK = 256

# Mesh axis of `shard_candidates`.
CANDIDATE_AXIS = "candidates"


# ---------------------------------------------------------------------------
# Configs


def _check_objective(config) -> None:
    if config.aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: must be one of {AGGREGATIONS}; got {config.aggregation!r}")
    if config.propagation not in PROPAGATIONS:
        raise ValueError(f"propagation: must be one of {PROPAGATIONS}; got {config.propagation!r}")
    if not (0.0 < config.discount <= 1.0):
        raise ValueError(f"discount: must be in (0, 1]; got {config.discount!r}")
    if not (math.isfinite(config.position_bonus) and config.position_bonus >= 0.0):
        raise ValueError(f"position_bonus: must be a finite number >= 0; got "
                         f"{config.position_bonus!r}")
    _check_positive(config, "horizon")
    if config.rollout_chunk not in (None, "auto"):
        _check_positive(config, "rollout_chunk")
    if not isinstance(config.shard_candidates, (bool, np.bool_)):
        raise ValueError(f"shard_candidates: must be True or False; got {config.shard_candidates!r}")


def _check_positive(config, *names) -> None:
    for name in names:
        positive_int(name, getattr(config, name))


@dataclasses.dataclass(frozen=True)
class RandomShootingConfig:
    """Random shooting for discrete actions (docs/design.md, decisions table).

    Attributes:
      num_actions: number of discrete actions; candidates are uniform on
        {0, ..., num_actions - 1} at every step.
      num_candidates: candidate sequences per plan (1000).
      horizon: steps per sequence.
      discount: γ of the score (paper 0.93; the authors' final code 1.0).
      aggregation: "min" over ensemble members (paper) or "mean" (authors'
        final code).
      propagation: "members" (each member rolls out its own states) or
        "ensemble_mean" (every member is fed the ensemble-mean state, as the
        authors' CEM for continuous actions).
      position_bonus: weight of the shaping bonus max_τ ŝ_τ[position_index]
        added at every step (0 turns it off; the paper's per-env values are
        in `experiments.paper`).
      position_index: which state coordinate the bonus maximises.
      warm_start: replace candidate 0 by the previous best plan shifted.
      rollout_chunk: candidates rolled out at once (`lax.map` over chunks
        after the shared prefix steps); None: all; "auto": at most
        `CPU_ROLLOUT_CHUNK` on a CPU backend, all on accelerators. Speed and
        memory only: the scores are the same.
      shard_candidates: with more than one local device, split the
        candidates' rollouts over all of them (`shard_map`, one shard per
        device, chunked within it by `rollout_chunk`), unless the plan runs
        inside an already sharded region such as `evaluation.run_episodes`,
        which shards whole episodes instead. On a CPU made of one device per
        core (`persim_jax.use_cpu_cores`) this is what lets one plan use
        every core. Speed only: the scores are the same. Set it False to
        keep a plan on one device (e.g. when its inputs are committed to
        that device).
    """

    num_actions: int
    num_candidates: int = 1000
    horizon: int = 30
    discount: float = 0.93
    aggregation: str = "min"
    propagation: str = "members"
    position_bonus: float = 0.0
    position_index: int = 0
    warm_start: bool = True
    rollout_chunk: int | str | None = "auto"
    shard_candidates: bool = True

    def __post_init__(self):
        _check_positive(self, "num_actions", "num_candidates")
        _check_objective(self)


@dataclasses.dataclass(frozen=True)
class CEMConfig:
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
        rollout_chunk, shard_candidates: as in `RandomShootingConfig`.
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
    discount: float = 0.93
    aggregation: str = "min"
    propagation: str = "members"
    position_bonus: float = 0.0
    position_index: int = 0
    rollout_chunk: int | str | None = "auto"
    shard_candidates: bool = True

    def __post_init__(self):
        _check_positive(self, "action_dim", "num_samples", "num_elites")
        _check_objective(self)
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


@dataclasses.dataclass(frozen=True)
class ICEMConfig:
    """Improved CEM (Pinneri et al., CoRL 2020) for continuous actions in a box.

    Round i (0 .. num_rounds) samples max(num_samples · decay^-i, 2 ·
    num_elites) sequences of temporally correlated ("coloured") noise, power
    spectrum ∝ 1 / f^β along the horizon, around the mean μ with std σ,
    clipped to the box. A fraction `keep_elites` of the elites is carried to
    the next round (and, shifted by one step, to the next plan's first round);
    the last round also scores μ itself. μ and σ move towards the elites'
    mean and std with `momentum`; the plan plays the first action of the best
    sequence seen in any round (`execute="best"`, Pinneri et al.) or of the
    final μ (`execute="mean"`, as CEM plays its elite mean).

    Attributes:
      action_dim: A.
      num_samples: sequences of round 0.
      horizon: steps per sequence.
      num_elites: best sequences per round.
      num_rounds: rounds after the first.
      decay: the population shrinks by this factor every round (γ ≥ 1).
      beta: colour of the noise (0 white, 2 "red"/Brownian-like).
      keep_elites: fraction of the elites carried over (ξ).
      momentum: μ ← momentum · μ + (1 − momentum) · elite mean, σ likewise.
      init_std: σ at the start of every plan.
      execute: "best" (the best sequence scored) or "mean" (the final μ).
      action_low, action_high: the action box.
      min_std: floor of σ when sampling.
      discount, aggregation, propagation, position_bonus, position_index,
        rollout_chunk, shard_candidates: as in `RandomShootingConfig`.
    """

    action_dim: int
    num_samples: int = 100
    horizon: int = 30
    num_elites: int = 10
    num_rounds: int = 3
    decay: float = 1.25
    beta: float = 2.5
    keep_elites: float = 0.3
    momentum: float = 0.1
    init_std: float = 0.5
    execute: str = "best"
    action_low: float = -1.0
    action_high: float = 1.0
    min_std: float = 1e-6
    discount: float = 0.93
    aggregation: str = "min"
    propagation: str = "members"
    position_bonus: float = 0.0
    position_index: int = 0
    rollout_chunk: int | str | None = "auto"
    shard_candidates: bool = True

    def __post_init__(self):
        _check_positive(self, "action_dim", "num_samples", "num_elites")
        _check_objective(self)
        if not 2 <= self.num_elites <= self.num_samples:
            raise ValueError(f"num_elites: must be in [2, num_samples={self.num_samples}]; got "
                             f"{self.num_elites!r}")
        if not isinstance(self.num_rounds, (int, np.integer)) or self.num_rounds < 0:
            raise ValueError(f"num_rounds: must be an integer >= 0; got {self.num_rounds!r}")
        if not (math.isfinite(self.decay) and self.decay >= 1.0):
            raise ValueError(f"decay: must be a number >= 1; got {self.decay!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0.0):
            raise ValueError(f"beta: must be a number >= 0; got {self.beta!r}")
        if not 0.0 <= self.keep_elites <= 1.0:
            raise ValueError(f"keep_elites: must be in [0, 1]; got {self.keep_elites!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must be in [0, 1); got {self.momentum!r}")
        if not self.init_std > 0.0:
            raise ValueError(f"init_std: must be > 0; got {self.init_std!r}")
        if self.execute not in ("best", "mean"):
            raise ValueError(f"execute: must be 'best' or 'mean'; got {self.execute!r}")
        if not self.action_low < self.action_high:
            raise ValueError(f"action_low, action_high: need low < high; got "
                             f"{self.action_low!r}, {self.action_high!r}")

    def population(self) -> tuple[int, ...]:
        """Sequences sampled in each round (before the carried elites)."""
        return tuple(max(int(self.num_samples * self.decay ** -i), 2 * self.num_elites)
                     for i in range(self.num_rounds + 1))

    @property
    def num_kept(self) -> int:
        return int(round(self.keep_elites * self.num_elites))

    def sequences_per_plan(self) -> int:
        """Sequences scored per plan: sampled, carried elites and the final mean."""
        return sum(self.population()) + self.num_kept * (self.num_rounds + 1) + 1


def colored_noise(key: Array, beta: float, shape: tuple[int, ...]) -> Array:
    """Gaussian noise of unit variance along the last axis (time) with power
    spectrum ∝ 1 / f^β (β = 0: white), independent over the leading axes."""
    steps = shape[-1]
    freqs = jnp.fft.rfftfreq(steps)
    freqs = freqs.at[0].set(1.0 / steps)           # the lowest frequency's weight for f = 0
    scale = freqs ** (-beta / 2.0)
    real_key, imag_key = jax.random.split(key)
    spectrum_shape = (*shape[:-1], freqs.shape[0])
    real = jax.random.normal(real_key, spectrum_shape) * scale
    imag = jax.random.normal(imag_key, spectrum_shape) * scale
    # The f = 0 (and, for an even length, the Nyquist) coefficient is real.
    imag = imag.at[..., 0].set(0.0)
    if steps % 2 == 0:
        imag = imag.at[..., -1].set(0.0)
    noise = jnp.fft.irfft(real + 1j * imag, n=steps, axis=-1)
    # x_t = (X_0 + 2 Σ_k Re(X_k e^{iωkt}) [+ X_{N/2} (−1)^t]) / N: each paired
    # coefficient adds 4 scale² to N² var(x_t), the real-only ones scale².
    weights = jnp.full(freqs.shape, 4.0).at[0].set(1.0)
    if steps % 2 == 0:
        weights = weights.at[-1].set(1.0)
    variance = jnp.sum(weights * scale ** 2) / steps ** 2
    return (noise / jnp.sqrt(variance)).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Scoring action sequences


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
      dynamics: the dynamics contract of this module (deterministic).
      reward_fn: R(obs, action, next_obs) broadcasting over leading axes.
      terminated_fn: termination of next_obs (leading axes), or None.
      obs: (D,) the current state ŝ_0.
      actions: (B, H) int or (B, H, A) float candidate sequences.
      discount: γ.
      propagation: "members" or "ensemble_mean" (see `RandomShootingConfig`).
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
        a time (None: all; "auto": see `RandomShootingConfig`).
      shard_candidates: split the candidates over all local devices (see
        `RandomShootingConfig`).

    Returns:
      (M, B) returns J_m; −inf where the rollout blew up (NaN/inf state while
      alive) or its return is not finite.
    """
    obs = jnp.asarray(obs, jnp.float32)
    actions = jnp.asarray(actions)
    num_sequences, horizon = actions.shape[:2]
    steps = jnp.swapaxes(actions, 0, 1)                                  # (H, B, ...)
    depth = shared_prefix_depth(num_actions, num_sequences, horizon)
    feed = functools.partial(_feed, propagation=propagation)
    accumulate = functools.partial(
        _accumulate, reward_fn=reward_fn, terminated_fn=terminated_fn, discount=discount,
        position_bonus=position_bonus, position_index=position_index)

    prefix, depth = _prefix_transitions(dynamics, feed, obs, steps, num_actions, depth)
    shape = prefix[2].shape[1:3]                                         # (M, B)
    first_state = jnp.broadcast_to(obs, (*shape, obs.shape[-1]))
    start = ReturnAccumulator(jnp.ones(shape, bool), jnp.ones(shape, bool),
                              jnp.zeros(shape, jnp.float32),
                              jnp.broadcast_to(first_state[..., position_index], shape))
    (accumulated, weight), _ = jax.lax.scan(lambda c, x: (accumulate(c, x), None),
                                            (start, jnp.float32(1.0)), prefix)

    rollout = functools.partial(_rollout, dynamics, feed, accumulate)
    rest = (feed(prefix[2][-1]), accumulated, steps[depth:])             # candidates on axis 1
    finite, total, best = _rollout_candidates(rollout, rest, weight, rollout_chunk=rollout_chunk,
                                              shard_candidates=shard_candidates)
    if position_bonus:
        total = total + position_bonus * horizon * best
    ok = finite & jnp.isfinite(total)
    return jnp.where(ok, total, -jnp.inf)


def _feed(predicted: Array, propagation: str) -> Array:
    """The states (M, B, D) the next step starts from: each member's own
    prediction, or the ensemble mean for every member."""
    if propagation == "members":
        return predicted
    return jnp.broadcast_to(jnp.mean(predicted, axis=0), predicted.shape)


def _accumulate(carry, transition, *, reward_fn, terminated_fn, discount, position_bonus,
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


def _rollout(dynamics: Dynamics, feed, accumulate, state: Array, accumulated: ReturnAccumulator,
             weight: Array, actions: Array) -> ReturnAccumulator:
    """The accumulator (M, b) after the remaining steps `actions` (H', b[, A])
    of the b candidates in `state` (M, b, D), from `accumulated` (M, b) and
    the weight () of the first of them."""

    def step(carry, action):
        state, accumulated = carry
        next_state = dynamics(state, action)
        return (feed(next_state), accumulate(accumulated, (state, action, next_state))), None

    (_, (accumulated, _)), _ = jax.lax.scan(step, (state, (accumulated, weight)), actions)
    return accumulated


def _prefix_transitions(dynamics: Dynamics, feed, obs: Array, steps: Array,
                        num_actions: int | None, depth: int):
    """The transitions of the candidates' first steps, computed once per
    distinct action prefix.

    Args:
      dynamics: the dynamics contract of this module.
      feed: `_feed` with the propagation.
      obs: (D,) ŝ_0.
      steps: (H, B) int or (H, B, A) float, the candidates' actions by step.
      num_actions: the number of discrete actions, or None.
      depth: `shared_prefix_depth` L.

    Returns:
      ((states (L', M, B, D), actions (L', B[, A]), next_states (L', M, B, D)),
      L'), with L' = L, or 1 (every candidate's first step) when L is 0.
    """
    num_sequences, dim = steps.shape[1], obs.shape[-1]
    if not depth:
        predicted = dynamics(jnp.broadcast_to(obs, (num_sequences, dim)), steps[0])
        first_state = jnp.broadcast_to(obs, predicted.shape)
        return (first_state[None], steps[:1], predicted[None]), 1
    # Level t holds the states after each of the num_actions^t prefixes;
    # child i · nA + j of node i took action j. A Python loop: the levels
    # differ in size (depth <= log_nA(B), about 10).
    children = jnp.arange(num_actions, dtype=steps.dtype)
    predicted = dynamics(jnp.broadcast_to(obs, (num_actions, dim)), children)
    levels, inputs = [predicted], [jnp.broadcast_to(obs, (predicted.shape[0], 1, dim))]
    for _ in range(1, depth):
        fed = feed(levels[-1])
        inputs.append(fed)
        levels.append(dynamics(jnp.repeat(fed, num_actions, axis=1),
                               jnp.tile(children, fed.shape[1])))
    # Each candidate's node at every level: its prefix read in base nA.
    node = jnp.zeros((num_sequences,), jnp.int32)
    fed_states, next_states = [], []
    for t in range(depth):
        fed_states.append(jnp.take(inputs[t], node, axis=1))
        node = node * num_actions + steps[t].astype(jnp.int32)
        next_states.append(jnp.take(levels[t], node, axis=1))
    return (jnp.stack(fed_states), steps[:depth], jnp.stack(next_states)), depth


def _rollout_candidates(rollout_fn, rest, weight: Array, *, rollout_chunk: int | str | None,
                        shard_candidates: bool):
    """(finite, total, best) (M, B) after the remaining steps of all B candidates.

    Args:
      rollout_fn: `rollout_fn(state (M, b, D), accumulator (M, b), weight,
        actions (H', b[, A])) -> accumulator (M, b)` for any b candidates.
      rest: (state (M, B, D), `ReturnAccumulator` (M, B), actions (H', B[, A])),
        the candidates on axis 1.
      weight: () γ^t of the first remaining step.
      rollout_chunk, shard_candidates: as in `member_returns`.
    """
    if rollout_chunk == "auto":
        rollout_chunk = CPU_ROLLOUT_CHUNK if jax.default_backend() == "cpu" else None
    in_chunks = functools.partial(_rollout_in_chunks, rollout_fn, rollout_chunk=rollout_chunk)
    devices = _candidate_devices(shard_candidates)
    if devices is None:
        return in_chunks(rest, weight)
    # One shard of the candidates per device, no communication until the
    # scores come back (on a CPU with one device per core, each core
    # rolls out its own candidates: see `persim_jax.use_cpu_cores`).
    num_members, num_sequences = rest[0].shape[:2]
    num_devices = len(devices)
    size = math.ceil(num_sequences / num_devices)
    shards = jax.tree.map(lambda x: _split_candidates(x, num_devices, size), rest)
    mesh = Mesh(np.asarray(devices), (CANDIDATE_AXIS,))
    spec = PartitionSpec(CANDIDATE_AXIS)
    sharded = jax.shard_map(lambda r, w: tuple(x[None] for x in in_chunks(
                                jax.tree.map(lambda x: x[0], r), w)),
                            mesh=mesh, in_specs=(spec, PartitionSpec()),
                            out_specs=(spec,) * 3, check_vma=False)
    return tuple(jnp.moveaxis(x, 0, 1).reshape(num_members, -1)[:, :num_sequences]
                 for x in sharded(shards, weight))


def _rollout_in_chunks(rollout_fn, rest, weight: Array, *, rollout_chunk: int | None):
    """(finite, total, best) (M, b) of the b candidates in `rest` (see
    `_rollout_candidates`), `rollout_chunk` at a time (None: all at once)."""
    num_members, count = rest[0].shape[:2]
    num_chunks = 1 if not rollout_chunk else math.ceil(count / rollout_chunk)
    if num_chunks <= 1:
        accumulated = rollout_fn(rest[0], rest[1], weight, rest[2])
        return accumulated.finite, accumulated.total, accumulated.best
    # Candidates in chunks, one after the other (lax.map): on a CPU one
    # chunk's activations then stay in cache for the whole step.
    size = math.ceil(count / num_chunks)
    chunks = jax.tree.map(lambda x: _split_candidates(x, num_chunks, size), rest)
    chunked = jax.lax.map(lambda r: rollout_fn(r[0], r[1], weight, r[2]), chunks)
    return tuple(jnp.moveaxis(x, 0, 1).reshape(num_members, -1)[:, :count]
                 for x in (chunked.finite, chunked.total, chunked.best))


def _split_candidates(x: Array, parts: int, size: int) -> Array:
    """(A, B, ...) -> (parts, A, size, ...), B padded to parts · size with
    copies of the first candidates (their scores are dropped)."""
    pad = parts * size - x.shape[1]
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], (x.shape[0], pad, *x.shape[2:]))],
                            axis=1)
    return jnp.moveaxis(x.reshape(x.shape[0], parts, size, *x.shape[2:]), 1, 0)


def _candidate_devices(shard_candidates: bool):
    """The devices to split candidates over, or None: only with more than one
    local device, and not inside a region that is already sharded by hand
    (`evaluation.run_episodes` gives every device whole episodes)."""
    if not shard_candidates or jax.local_device_count() < 2:
        return None
    if jax.sharding.get_abstract_mesh().manual_axes:
        return None
    return tuple(jax.local_devices())


def aggregate(returns: Array, aggregation: str = "min") -> Array:
    """(B,) scores from (M, B) member returns: min (paper) or mean over M."""
    if aggregation == "min":
        return jnp.min(returns, axis=0)
    if aggregation == "mean":
        return jnp.mean(returns, axis=0)
    raise ValueError(f"aggregation: must be one of {AGGREGATIONS}; got {aggregation!r}")


def score_sequences(dynamics: Dynamics, reward_fn: RewardFn, terminated_fn: TerminatedFn | None,
                    obs: Array, actions: Array, config, *, num_actions: int | None = None) -> Array:
    """(B,) scores of (B, H[, A]) sequences from obs (D,) under `config`'s
    objective (discount, propagation, shaping, aggregation); −inf never wins."""
    returns = member_returns(
        dynamics, reward_fn, terminated_fn, obs, actions, discount=config.discount,
        propagation=config.propagation, position_bonus=config.position_bonus,
        position_index=config.position_index, num_actions=num_actions,
        rollout_chunk=config.rollout_chunk, shard_candidates=config.shard_candidates)
    scores = aggregate(returns, config.aggregation)
    return jnp.where(jnp.isnan(scores), -jnp.inf, scores)


# ---------------------------------------------------------------------------
# Planners


class Planner(NamedTuple):
    """A planner: pure functions and their config.

    Attributes:
      init: `init() -> state`, the state at the start of an episode (no warm
        start yet).
      plan: `plan(key, state, obs (D,), dynamics) -> (action, state)`; the
        action is () int32 (discrete) or (A,) float32 (continuous), the state
        carries the warm start to the next call.
      config: the planner's config dataclass.
      sequence: continuous planners: `sequence(key, state, obs, dynamics) ->
        (sequence (H, A), state)`, the whole action sequence whose first
        action `plan` plays (for measuring a planner's objective; None
        otherwise).
    """

    init: Callable[[], Any]
    plan: Callable[[Array, Any, Array, Dynamics], tuple[Array, Any]]
    config: Any
    sequence: Callable[[Array, Any, Array, Dynamics], tuple[Array, Any]] | None = None


class RandomShootingState(NamedTuple):
    """Warm start of random shooting.

    Attributes:
      previous_plan: (H,) int32 best sequence of the last plan.
      has_previous: () bool, False at the start of an episode.
    """

    previous_plan: Array
    has_previous: Array


class CEMState(NamedTuple):
    """Warm start of CEM: mean (H, A) of the next plan's first round."""

    mean: Array


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
        candidates = jax.random.randint(
            key, (config.num_candidates, config.horizon), 0, config.num_actions, jnp.int32)
        if config.warm_start:
            shifted = jnp.concatenate([state.previous_plan[1:], candidates[0, -1:]])
            candidates = candidates.at[0].set(
                jnp.where(state.has_previous, shifted, candidates[0]))
        scores = score_sequences(dynamics, reward_fn, terminated_fn, obs, candidates, config,
                                 num_actions=config.num_actions)
        best = candidates[jnp.argmax(scores)]
        return best[0], RandomShootingState(best, jnp.array(True))

    return Planner(init, plan, config)


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


class ICEMState(NamedTuple):
    """Warm start of iCEM: the mean (H, A) and the carried elites (k, H, A),
    both shifted by one step; `has_elites` False at the start of an episode."""

    mean: Array
    elites: Array
    has_elites: Array


def icem(config: ICEMConfig, reward_fn: RewardFn,
         terminated_fn: TerminatedFn | None = None) -> Planner:
    """Improved-CEM MPC for continuous actions in a box (`ICEMConfig`).

    One compiled program per plan: the rounds are unrolled (their
    populations differ in size), each round's sequences scored as CEM's
    (`score_sequences`: the min over members by default). Plays the first
    action of the best sequence seen in any round, or of the final mean
    (`config.execute`).
    """
    if not isinstance(config, ICEMConfig):
        raise ValueError(f"config: expected an ICEMConfig, got {type(config).__name__}")
    shape = (config.horizon, config.action_dim)
    low, high = config.action_low, config.action_high
    kept = config.num_kept

    def init() -> ICEMState:
        return ICEMState(jnp.zeros(shape, jnp.float32), jnp.zeros((kept, *shape), jnp.float32),
                         jnp.array(False))

    def sample(key, mean, std, count):
        noise = colored_noise(key, config.beta, (count, config.action_dim, config.horizon))
        return jnp.clip(mean + std * jnp.swapaxes(noise, 1, 2), low, high)

    def plan_sequence(key, state: ICEMState, obs, dynamics):
        """(the best sequence seen (H, A); state)."""
        keys = jax.random.split(key, config.num_rounds + 2)
        mean, std = state.mean, jnp.full(shape, config.init_std, jnp.float32)
        # Round 0 carries the previous plan's elites, shifted; fresh samples
        # stand in for them at the start of an episode.
        carried = jnp.where(state.has_elites, state.elites,
                            sample(keys[-1], mean, std, kept))
        best, best_score = jnp.zeros(shape, jnp.float32), jnp.array(-jnp.inf)
        populations = config.population()
        for i, count in enumerate(populations):
            candidates = sample(keys[i], mean, jnp.maximum(std, config.min_std), count)
            parts = [candidates] + ([carried] if kept else [])
            if i == len(populations) - 1:
                parts.append(jnp.clip(mean, low, high)[None])
            candidates = jnp.concatenate(parts)
            scores = score_sequences(dynamics, reward_fn, terminated_fn, obs, candidates, config)
            top, index = jax.lax.top_k(scores, config.num_elites)
            elite = candidates[index]
            better = top[0] > best_score
            best = jnp.where(better, elite[0], best)
            best_score = jnp.where(better, top[0], best_score)
            carried = elite[:kept]
            mean = config.momentum * mean + (1 - config.momentum) * jnp.mean(elite, 0)
            std = config.momentum * std + (1 - config.momentum) * jnp.std(elite, 0, ddof=1)

        def shift(x):
            return jnp.concatenate([x[..., 1:, :], jnp.zeros_like(x[..., :1, :])], axis=-2)

        played = best if config.execute == "best" else mean
        played = jnp.clip(jnp.nan_to_num(played), low, high)
        return played, ICEMState(shift(mean), shift(carried), jnp.array(True))

    def plan(key, state: ICEMState, obs, dynamics):
        sequence, state = plan_sequence(key, state, obs, dynamics)
        return sequence[0], state

    return Planner(init, plan, config, plan_sequence)


def planner_config(env, **fields) -> RandomShootingConfig | CEMConfig:
    """A planner config for `env`: a `RandomShootingConfig` with
    num_actions=env.num_actions for discrete actions, a `CEMConfig` with
    action_dim=env.action_dim for continuous ones (unless given); the other
    fields as given, the dataclass defaults otherwise. The paper's fields per
    env: `experiments.paper.planner_config(env)`."""
    if env.discrete_actions:
        return RandomShootingConfig(**{"num_actions": env.num_actions, **fields})
    return CEMConfig(**{"action_dim": env.action_dim, **fields})


def make_planner(config: RandomShootingConfig | CEMConfig, env) -> Planner:
    """The planner of `config` with the env's known reward and termination:
    `random_shooting` for a `RandomShootingConfig`, `cem` for a `CEMConfig`."""
    if isinstance(config, RandomShootingConfig):
        return random_shooting(config, env.reward, env.terminated)
    if isinstance(config, CEMConfig):
        return cem(config, env.reward, env.terminated)
    if isinstance(config, ICEMConfig):
        return icem(config, env.reward, env.terminated)
    raise ValueError(f"config: expected a RandomShootingConfig, CEMConfig or ICEMConfig, got "
                     f"{type(config).__name__}")


# ---------------------------------------------------------------------------
# Dynamics: a learned Simulator


def simulator_dynamics(simulator, agent_id) -> Dynamics:
    """The dynamics of agent `agent_id` under every member of `simulator`.

    Equal (to float32 rounding) to `simulator.predict` / `predict_members`,
    with the work that does not depend on states or candidates hoisted out of
    the rollout (see `model.fold_member`). Jittable and vmappable over agent_id.

    Args:
      simulator: a trained `persim_jax.Simulator` (M members).
      agent_id: () int, the agent's index 0..N−1 in the simulator.

    Returns:
      dynamics(obs (B, D) or (M, B, D), action (B,) / (B, A)) -> (M, B, D).
    """
    config = simulator.config
    folded = jax.vmap(model.fold_member, in_axes=(0, None, None, None))(
        simulator.params, simulator.stats, config, jnp.asarray(agent_id, jnp.int32))

    def dynamics(obs, action):
        obs_axis = 0 if obs.ndim == 3 else None
        return jax.vmap(model.folded_next_obs, in_axes=(0, None, obs_axis, None))(
            folded, config, obs, action)

    return dynamics


# ---------------------------------------------------------------------------
# Dynamics: the true environment ("True env + MPC")


def env_dynamics(env, params) -> Dynamics:
    """The true dynamics of one agent (M = 1), from `env.step_env`.

    Each next state is one `env.step_env` (vmapped over B) from the state
    rebuilt by `env.state_from_obs` with the agent's physics `params` (leaves of
    shape ()). The episode cap and the env's own `done` are ignored: the
    planner applies `env.terminated` to the predicted states. The env's key
    is fixed: the environments are deterministic.

    Returns:
      dynamics(obs (B, D) or (1, B, D), action (B,) / (B, A)) -> (1, B, D).
    """
    key = jax.random.PRNGKey(0)

    def one(obs, action):
        state = env.state_from_obs(obs, params)
        next_obs, _, _, _, _ = env.step_env(key, state, action, params)
        return next_obs.astype(jnp.float32)

    def dynamics(obs, action):
        if obs.ndim == 3:
            if obs.shape[0] != 1:
                raise ValueError(f"obs: the true env has one member; got {obs.shape[0]}")
            obs = obs[0]
        return jax.vmap(one)(obs, action)[None]

    return dynamics
