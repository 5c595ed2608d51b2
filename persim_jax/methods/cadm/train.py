"""CaDM's training: one jitted program per epoch (`lax.scan` over minibatches,
the loss vmapped over members); iterations × (≤ epochs epochs) with CaDM's
stop rule, a fresh validation split and bootstrap every iteration, resumable
checkpoints after each iteration (`persim_jax.training.run_loop`)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from persim_jax import checkpoints, training
from persim_jax.methods.cadm.model import (
    VANILLA,
    CaDMConfig,
    CaDMModel,
    PairData,
    Stats,
    compute_stats,
    gather_history,
    init_params,
    member_loss,
    pair_data,
    total_loss,
)
from persim_jax.data import Transitions, validate_transitions

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
def epoch_program(config: CaDMConfig):
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
def validation_program(config: CaDMConfig):
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
    run_epoch, validate = epoch_program(config), validation_program(config)

    def step(state: TrainState, iteration: int, length: int):
        del length                                        # one iteration per call
        state = _fit_once(state, stats, data, jax.random.fold_in(run_key, iteration),
                          config, num_validation, steps, batch, run_epoch, validate)
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
              num_validation: int, steps: int, batch: int, run_epoch, validate) -> TrainState:
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
        params, opt_state, _ = run_epoch(params, opt_state, stats, data, order)
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
