"""Vanilla and PE-TS CaDM, the paper's model-based baselines (appendix D.2), in JAX.

Context-aware dynamics models (Lee et al. 2020) as the authors' TensorFlow
code does them (younggyoseo/CaDM @38c11a5; shared/reference/baselines.md §1):
no agent id, no covariates; a model adapts to an agent through a context
c ∈ R^10 encoded from the agent's K = 10 latest real transitions.

  * context encoder g (one per member): (Δs_{t-K} … Δs_{t-1}, a_{t-K} …
    a_{t-1}), oldest first, raw Δs and one-hot (discrete) or raw actions,
    zero slots before the K-th step -> 256 -> 128 -> 64 (ReLU) -> 10;
  * forward model: (z-scored s, action, c) -> 4 × 200 swish -> mean and
    log-variance of the z-scored Δ = s' - s; backward model (loss only): (z-scored
    s', action, c) -> the same -> s - s';
  * loss: mean squared error (Vanilla) or the Gaussian NLL with soft-bounded
    log-variance (PE), + 0.5 × the backward model's squared error,
    + Σ_l λ_l ½‖W_l‖² (λ 2.5e-5, 5e-5, 7.5e-5, … per layer, 1e-4 for the
    heads); trained on (c_t, transition t + j) for j < F = 10: every
    transition is predicted from the contexts of the 10 anchors before it
    (one step each, teacher-forced);
  * Vanilla: one member, deterministic; PE-TS: 5 bootstrapped members with
    Gaussian heads and 20 particles, each kept on one member (TS-∞), a new
    Gaussian draw each step.

Training is one jitted program per epoch (`lax.scan` over minibatches, the
loss vmapped over members); a Python loop runs iterations × (≤ epochs
epochs) with CaDM's stop rule, a fresh validation split and bootstrap every
iteration, and resumable checkpoints after each iteration (the loop is
`persim_jax.training.run_loop`).

    method = cadm.VanillaCaDM()                     # cadm.PETSCaDM(): PE-TS
    trained = method.train(transitions, method.key("train", seed=0))
    model = method.dynamics_for_agent(trained, agent_ids=[0, 1, 2, 3, 4])

At evaluation the model is a `evaluation.ContextualDynamics`: the episode
loop pushes each real transition into the context history (`observe`), and
plans on `dynamics(context)`, whose context stays fixed over the horizon.

Where we differ from the authors' code, and why (docs/design.md):
  * all 500 trajectories are the buffer from iteration 0, and each of the
    paper's 100 iterations is one fit (≤ 5 epochs) on it: our data is
    offline, there is nothing to collect between iterations;
  * anchor 0 of a trajectory (empty history) is trained on; theirs is masked;
  * each member plans with its own context (their tiling pairs particles
    with other members' contexts), and CEM contexts are not re-transposed;
  * HalfCheetah keeps our observation as it is (their env drops x-velocity
    and takes sin/cos of one angle); continuous history actions are raw;
  * TS noise is a counter-based draw keyed by (episode step, particle,
    state, action): the planner's dynamics is a pure function, so the draw is
    a function of its inputs; this also keeps the planner's shared action
    prefixes exact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from persim_jax import checkpoints, planning, training
from persim_jax.cadm_model import (  # noqa: F401 -- re-exported: cadm's public names
    FILE_FORMAT,
    HEAD_WEIGHT_DECAY,
    LOGVAR_BOUND_WEIGHT,
    MAX_LOGVAR_INIT,
    MIN_LOGVAR_INIT,
    PE_TS,
    VANILLA,
    WEIGHT_DECAY_MAX,
    WEIGHT_DECAY_STEP,
    CaDMConfig,
    CaDMModel,
    PairData,
    Stats,
    compute_stats,
    encode_actions,
    encode_context,
    flat_history,
    forward_heads,
    gather_history,
    history_index,
    init_params,
    member_loss,
    pair_data,
    pair_index,
    path_rows,
    total_loss,
)
from persim_jax.data import Transitions, validate_transitions
from persim_jax.methods import Method

CHECKPOINT_FORMAT = 1
# Kept under its old name for callers that have not moved to `gather_history`.
_gather_history = gather_history
# The stop rule: a rolling mean of the validation loss, ρ = 0.99, started at
# 1.5 × the first value (÷ 1.5 when negative); a fit stops when it rises.
STOP_RHO = 0.99
STOP_START = 1.5


def make_optimizer(config: CaDMConfig) -> optax.GradientTransformation:
    return optax.adam(config.learning_rate)


@functools.lru_cache(maxsize=16)
def _epoch_program(config: CaDMConfig):
    optimizer = make_optimizer(config)

    def epoch(params, opt_state, stats, data: PairData, order):
        """order (steps, E, B) pair rows; returns the new params, optimiser
        state and the mean training loss per member (E,)."""
        def step(carry, index):
            params, opt_state = carry
            (_, losses), grads = jax.value_and_grad(total_loss, has_aux=True)(
                params, stats, config, data, index)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), losses

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, losses.mean(axis=0)

    return jax.jit(epoch)


@functools.lru_cache(maxsize=16)
def _validation_program(config: CaDMConfig):
    def validate(params, stats, data, index):
        """(E,) each member's loss without weight decay on the pairs index (V,)."""
        bounds = (params["max_logvar"], params["min_logvar"])
        return jax.vmap(member_loss, in_axes=(0, None, None, None, None, None, None))(
            params["members"], bounds, stats, config, data, index, False)

    return jax.jit(validate)


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    validation_loss: jax.Array   # (E,)


def fit(transitions: Transitions, config: CaDMConfig | None = None, *, key: jax.Array,
        checkpoint_dir: str | os.PathLike | None = None, progress: bool = True) -> CaDMModel:
    """Trains CaDM on every agent's transitions (the ids are not used).

    Iteration i (of `config.iterations`) uses fold_in(key, i): a validation
    split of min(10 %, 5000) pairs, each member's bootstrap resample of the
    rest (E > 1), then ≤ `config.epochs` epochs until the stop rule fires.

    Args:
      transitions: the logged data; each agent's rows in time order.
      config: `CaDMConfig` (default: Vanilla, the paper's iterations).
      key: PRNG key.
      checkpoint_dir: resumable orbax checkpoints after every iteration; a
        directory holding a different run is refused.
      progress: show a tqdm bar.

    Returns:
      the trained `CaDMModel`.
    """
    config = config or VANILLA
    validate_transitions(transitions)
    data = pair_data(transitions, config)
    num_pairs = int(data.pairs.shape[0])
    if num_pairs < 2:
        raise ValueError(f"transitions: CaDM needs at least 2 transitions; got {num_pairs}")
    stats = compute_stats(data, transitions.discrete)
    action_size = int(data.action.shape[-1])
    init_key, run_key = jax.random.split(key)
    params = init_params(init_key, config, transitions.obs_dim, action_size)
    ensemble = config.ensemble_size
    state = TrainState(params, make_optimizer(config).init(params),
                       jnp.full((ensemble,), jnp.nan, jnp.float32))

    num_validation = max(1, min(int(config.validation_fraction * num_pairs),
                                config.max_validation))
    num_train = num_pairs - num_validation
    per_epoch = min(num_train, config.pairs_per_epoch or num_train)
    batch = min(config.batch_size, per_epoch)
    steps = per_epoch // batch
    epoch_program, validate = _epoch_program(config), _validation_program(config)

    def step(state: TrainState, iteration: int, length: int):
        del length                                        # one iteration per call
        state = _fit_once(state, stats, data, jax.random.fold_in(run_key, iteration),
                          config, num_validation, steps, batch, epoch_program, validate)
        return state, state.validation_loss

    state, _ = training.run_loop(
        state, step, num_steps=config.iterations, checkpoint_dir=checkpoint_dir,
        run_description=(None if checkpoint_dir is None
                         else _run_description(data, config, key)),
        unit="iteration", desc=f"cadm (E={ensemble})", progress=progress,
        postfix=lambda losses: dict(val=f"{float(np.mean(losses)):.4g}"))
    return CaDMModel(params=state.params, stats=stats, validation_loss=state.validation_loss,
                     config=config, obs_dim=transitions.obs_dim,
                     num_actions=transitions.num_actions, action_dim=transitions.action_dim)


def _fit_once(state: TrainState, stats: Stats, data: PairData, key, config: CaDMConfig,
              num_validation: int, steps: int, batch: int, epoch_program, validate) -> TrainState:
    """One of CaDM's fits: ≤ epochs epochs with the stop rule."""
    split_key, boot_key, shuffle_key = jax.random.split(key, 3)
    num_pairs = int(data.pairs.shape[0])
    permutation = jax.random.permutation(split_key, num_pairs)
    validation, train = permutation[:num_validation], permutation[num_validation:]
    ensemble = config.ensemble_size
    if ensemble > 1:       # each member its own resample, with replacement
        draws = jax.random.randint(boot_key, (ensemble, train.shape[0]), 0, train.shape[0])
        rows = train[draws]
    else:
        rows = train[None]
    params, opt_state = state.params, state.opt_state
    rolling, losses = None, state.validation_loss
    for epoch in range(config.epochs):
        keys = jax.random.split(jax.random.fold_in(shuffle_key, epoch), ensemble)
        shuffled = jax.vmap(lambda k, r: r[jax.random.permutation(k, r.shape[0])])(keys, rows)
        order = jnp.swapaxes(shuffled[:, :steps * batch].reshape(ensemble, steps, batch), 0, 1)
        params, opt_state, _ = epoch_program(params, opt_state, stats, data, order)
        losses = validate(params, stats, data, validation)
        value = float(jnp.sum(losses))
        if rolling is None:
            rolling = value * STOP_START if value >= 0 else value / STOP_START
        updated = STOP_RHO * rolling + (1.0 - STOP_RHO) * value
        if updated > rolling:
            break
        rolling = updated
    return TrainState(params, opt_state, losses)


def _run_description(data: PairData, config: CaDMConfig, key) -> dict:
    """What must match for a checkpoint to be resumed (JSON-able)."""
    description = {"format": CHECKPOINT_FORMAT,
                   **{k: v for k, v in config.to_dict().items() if k != "iterations"},
                   "key": checkpoints.key_list(key),
                   "data_sha256": checkpoints.data_digest(data)}
    return json.loads(json.dumps(description))


# ---------------------------------------------------------------------------
# Evaluation: the context from the episode's real history


class Context(NamedTuple):
    """The real history of an episode: the K latest (Δs, encoded action),
    oldest first, zero slots not yet filled; count () transitions seen; key
    of the episode's TS noise."""

    deltas: jax.Array    # (K, D)
    actions: jax.Array   # (K, A)
    count: jax.Array
    key: jax.Array


@struct.dataclass
class CaDMDynamics:
    """A `CaDMModel` as an `evaluation.ContextualDynamics`.

    `for_planning=False` (the prediction protocol): each member's mean, one
    member per output row (M = E). True (MPC): P particles, particle p on
    member p // (P / E) (TS-∞), each a Gaussian draw when the model is
    probabilistic (M = P).
    """

    model: CaDMModel
    for_planning: bool = struct.field(pytree_node=False, default=True)

    def init(self, key) -> Context:
        model = self.model
        k = model.config.history
        return Context(jnp.zeros((k, model.obs_dim), jnp.float32),
                       jnp.zeros((k, model.action_size), jnp.float32),
                       jnp.zeros((), jnp.int32), key)

    def observe(self, context: Context, obs, action, next_obs) -> Context:
        row_delta = (next_obs - obs).astype(jnp.float32)
        row_action = encode_actions(action, self.model.num_actions)
        k = self.model.config.history
        full = context.count >= k
        # Filling: write slot `count`; full: drop the oldest, append at the end.
        slot = jnp.where(full, k - 1, context.count)
        deltas = jnp.where(full, jnp.roll(context.deltas, -1, axis=0), context.deltas)
        actions = jnp.where(full, jnp.roll(context.actions, -1, axis=0), context.actions)
        return Context(deltas.at[slot].set(row_delta), actions.at[slot].set(row_action),
                       context.count + 1, jax.random.fold_in(context.key, context.count))

    def contexts(self, context: Context) -> jax.Array:
        """(E, C) each member's context vector."""
        history = flat_history(context.deltas, context.actions)
        return jax.vmap(encode_context, in_axes=(0, None))(
            self.model.params["members"]["encoder"], history)

    def dynamics(self, context: Context) -> planning.Dynamics:
        model = self.model
        config = model.config
        members = model.params["members"]
        bounds = (model.params["max_logvar"], model.params["min_logvar"])
        stats = model.stats
        codes = self.contexts(context)                                   # (E, C)
        ensemble = config.ensemble_size
        per_member = config.particles // ensemble if self.for_planning else 1
        noisy = self.for_planning and config.probabilistic

        def member_step(member, code, obs, action_in):
            """(mean, std) (N, D) in raw units for obs (N, D)."""
            code = jnp.broadcast_to(code, (obs.shape[0], code.shape[-1]))
            mean, logvar = forward_heads(member, bounds, stats, obs, action_in, code)
            next_obs = obs + mean * stats.delta_std + stats.delta_mean
            return next_obs, stats.delta_std * jnp.exp(0.5 * logvar)

        def dynamics(obs, action):
            rows = per_member * ensemble
            batch = obs.shape[-2]
            action_in = encode_actions(action, model.num_actions)
            if obs.ndim == 2:
                obs = jnp.broadcast_to(obs, (rows, *obs.shape))
            grouped = obs.reshape(ensemble, per_member * batch, obs.shape[-1])
            tiled = jnp.tile(action_in, (per_member, 1))
            mean, std = jax.vmap(member_step, in_axes=(0, 0, 0, None))(members, codes, grouped,
                                                                        tiled)
            if noisy:
                mean = mean + std * _keyed_normal(context.key, grouped, tiled)
            return mean.reshape(rows, batch, obs.shape[-1])

        return dynamics


def _keyed_normal(key, obs: jax.Array, action: jax.Array) -> jax.Array:
    """(E, N, D) standard normals, a function of (key, row position, state,
    action): each particle row (its index within the member's group, and the
    member) gets its own stream for each distinct input."""
    ensemble, rows, dim = obs.shape
    bits = jax.lax.bitcast_convert_type(obs.astype(jnp.float32), jnp.uint32)
    action_bits = jax.lax.bitcast_convert_type(jnp.broadcast_to(action, (ensemble, *action.shape)),
                                               jnp.uint32)
    words = jnp.concatenate([bits, action_bits], axis=-1)
    position = (jnp.arange(ensemble, dtype=jnp.uint32)[:, None] * jnp.uint32(rows)
                + jnp.arange(rows, dtype=jnp.uint32)[None, :])
    # FNV-1a over the words: a cheap, well-mixed 32-bit seed per row.
    seed = jnp.full((ensemble, rows), 2166136261, jnp.uint32) ^ position
    for i in range(words.shape[-1]):
        seed = (seed ^ words[..., i]) * jnp.uint32(16777619)
    keys = jax.vmap(jax.vmap(lambda s: jax.random.fold_in(key, s)))(seed)
    return jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (dim,), jnp.float32)))(keys)


@struct.dataclass
class CaDMDynamicsForAgent:
    """(row, covariates) -> the CaDM model: the same for every agent (it
    tells agents apart by their history only)."""

    model: CaDMModel
    for_planning: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, row, covariates) -> CaDMDynamics:
        del row, covariates
        return CaDMDynamics(self.model, self.for_planning)


# ---------------------------------------------------------------------------
# Methods of the harness


@dataclasses.dataclass(frozen=True)
class VanillaCaDM(Method):
    """Vanilla CaDM: one deterministic context-conditioned model."""

    config: CaDMConfig = VANILLA
    name: ClassVar[str] = "vanilla_cadm"

    def description(self) -> dict:
        return self.config.to_dict()

    def training_description(self) -> dict:
        # Particles are a planning setting: `fit` never reads them, and
        # `dynamics_for_agent` plans with this method's, not the stored model's.
        return {k: v for k, v in self.description().items() if k != "particles"}

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> CaDMModel:
        del agent_ids                       # one model; agents differ by their history
        return fit(transitions, self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: CaDMModel, path) -> None:
        trained.save(path)

    def load(self, path) -> CaDMModel:
        return CaDMModel.load(path)

    def dynamics_for_agent(self, trained: CaDMModel, agent_ids, *, for_planning=True):
        if trained.config.particles != self.config.particles:   # trained for another run
            trained = trained.replace(config=dataclasses.replace(
                trained.config, particles=self.config.particles))
        return CaDMDynamicsForAgent(trained, for_planning)

    def planner_config(self, config):
        """CaDM's own objective on the run's planner: the particles' mean of
        undiscounted returns, no warm start; at most CaDM's 200 candidates;
        CEM starts every plan from σ = 0.5 (variance 0.25). A run that plans
        with iCEM plans CaDM with it too (its carried-over elites kept)."""
        fields = dict(aggregation="mean", discount=1.0)
        if isinstance(config, planning.RandomShootingConfig):
            fields.update(num_candidates=min(config.num_candidates, CANDIDATES), warm_start=False)
        else:
            fields.update(num_samples=min(config.num_samples, CANDIDATES),
                          num_elites=min(config.num_elites, min(config.num_samples, CANDIDATES)))
            if isinstance(config, planning.ICEMConfig):
                fields.update(init_std=0.5)
            else:
                fields.update(init_std_low=0.5, init_std_high=0.5)
        return dataclasses.replace(config, **fields)


# CaDM's planners draw 200 sequences (random shooting and CEM).
CANDIDATES = 200


@dataclasses.dataclass(frozen=True)
class PETSCaDM(VanillaCaDM):
    """PE-TS CaDM: 5 bootstrapped probabilistic members, 20 TS-∞ particles."""

    config: CaDMConfig = PE_TS
    name: ClassVar[str] = "pe_ts_cadm"
