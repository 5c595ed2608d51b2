"""Training an ensemble of personalised simulators (paper, Algorithm 1).

`fit` trains M ensemble members, which differ only in initialisation and batch
order, as one vmapped program: an epoch is one jitted call in which every
member runs a `lax.scan` over its own shuffled minibatches, then all members
are scored on the held-out transitions. The loop over epochs, its progress
and its checkpoints are `persim_jax.training.run_loop`'s.

Randomness: `key` is split into (split, init, shuffle) keys. The split key
draws the validation transitions (`validation_split`); the init key gives one
key per member; the shuffle key of epoch e is `fold_in(shuffle, e)`, split
into one key per member. A run resumed from a checkpoint at epoch e therefore
replays exactly the same computation as an uninterrupted one.

Loss: MSE on standardised Δ targets, mean over batch and dimensions (the
authors' loss). Optimiser: Adam (optax). The last partial minibatch of each
epoch is dropped; the permutation changes every epoch, so every transition is
used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from persim_jax import checkpoints, training
from persim_jax.validation import positive_int
from persim_jax.data import Transitions, jsonable, validate_transitions
from persim_jax.persim import model as model_lib
from persim_jax.persim.model import ModelConfig, NormStats
from persim_jax.persim.simulator import Simulator

RANK_CANDIDATES = (3, 5, 10, 15, 20, 30)
CHECKPOINT_FORMAT = 2
# Validation transitions are scored in chunks of this many, so that a large
# held-out set (e.g. 100k HalfCheetah transitions × 5 members) fits in memory.
VALIDATION_CHUNK = 8192


@struct.dataclass
class TrainState:
    """Everything an epoch updates; every leaf has a leading ensemble axis M.

    Attributes:
      params: current parameters.
      opt_state: Adam state.
      best_params: parameters of each member at its best validation loss.
      best_loss: (M,) best validation loss so far (+inf before the first).
    """

    params: Any
    opt_state: Any
    best_params: Any
    best_loss: jax.Array


@struct.dataclass
class Batch:
    """Model inputs and targets, already standardised.

    Attributes:
      agent_id: (T,) int32.
      obs: (T, D) standardised states.
      action: (T,) int32 or (T, A) standardised continuous actions.
      target: (T, D) standardised Δ = next_obs - obs.
      weight: (T,) 1 for real rows, 0 for padding (validation chunks).
    """

    agent_id: jax.Array
    obs: jax.Array
    action: jax.Array
    target: jax.Array
    weight: jax.Array


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    """What `fit` reports after each epoch (host values).

    Attributes:
      rank: the rank being trained.
      epoch: number of completed epochs (1-based).
      num_epochs: the total planned.
      train_loss: (M,) mean minibatch loss of the epoch, per member.
      validation_loss: (M,) validation MSE after the epoch (NaN without
        validation).
      best_validation_loss: (M,) best so far.
    """

    rank: int
    epoch: int
    num_epochs: int
    train_loss: np.ndarray
    validation_loss: np.ndarray
    best_validation_loss: np.ndarray


# ---------------------------------------------------------------------------
# Pure building blocks


def loss_fn(params, config: ModelConfig, batch: Batch) -> jax.Array:
    """Mean squared error of one network on a standardised batch (weighted
    mean over rows, mean over dimensions)."""
    pred = model_lib.apply(params, config, batch.agent_id, batch.obs, batch.action)
    per_row = jnp.mean(jnp.square(pred - batch.target), axis=-1)
    return jnp.sum(per_row * batch.weight) / jnp.maximum(jnp.sum(batch.weight), 1.0)


def make_batch(transitions: Transitions, stats: NormStats, index=None) -> Batch:
    """Standardised model inputs of `transitions` (rows `index`, default all)."""
    take = (lambda x: np.asarray(x)) if index is None else (lambda x: np.asarray(x)[index])
    obs = jnp.asarray(take(transitions.obs), jnp.float32)
    next_obs = jnp.asarray(take(transitions.next_obs), jnp.float32)
    action = take(transitions.action)
    return Batch(
        agent_id=jnp.asarray(take(transitions.agent_id), jnp.int32),
        obs=stats.normalize_obs(obs),
        action=stats.action_input(jnp.asarray(action), transitions.discrete),
        target=stats.normalize_delta(next_obs - obs),
        weight=jnp.ones(obs.shape[0], jnp.float32),
    )


def chunk_batch(batch: Batch, size: int) -> Batch:
    """Splits a (T, ...) batch into (C, size, ...) chunks, C = ceil(T / size),
    padding the last one with zero-weight rows (how validation sets are
    passed to the epoch function)."""
    t = batch.obs.shape[0]
    chunks = max(1, math.ceil(t / size))
    pad = chunks * size - t

    def reshape(x):
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        return x.reshape(chunks, size, *x.shape[1:])

    return jax.tree.map(reshape, batch)


def init_train_state(key: jax.Array, config: ModelConfig, ensemble_size: int,
                     optimizer: optax.GradientTransformation) -> TrainState:
    """M independently initialised members (one key each) and their Adam state."""
    keys = jax.random.split(key, ensemble_size)
    params = jax.vmap(model_lib.init_params, in_axes=(0, None))(keys, config)
    return TrainState(params=params, opt_state=jax.vmap(optimizer.init)(params),
                      best_params=params,
                      best_loss=jnp.full((ensemble_size,), jnp.inf, jnp.float32))


def make_optimizer(learning_rate: float, halving_epochs: int | None,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam; its step size halves every `halving_epochs` epochs (the authors'
    schedule: 150), or stays constant (None). The schedule counts optimiser
    steps in the Adam state, so a resumed run continues it exactly."""
    if halving_epochs is None:
        return optax.adam(learning_rate)
    return optax.adam(optax.exponential_decay(
        learning_rate, transition_steps=int(halving_epochs) * max(int(steps_per_epoch), 1),
        decay_rate=0.5, staircase=True))


@functools.lru_cache(maxsize=32)
def make_epoch_fn(config: ModelConfig, learning_rate: float, batch_size: int, num_train: int,
                  has_validation: bool, halving_epochs: int | None = None) -> Callable:
    """The jitted epoch of an ensemble (cached on its static arguments).

    Returns:
      epoch(state: TrainState, train: Batch (T_train, ...), validation: Batch
      chunked (C, chunk, ...), key) -> (state, train_loss (M,), validation_loss
      (M,)). Each member draws a permutation of the T_train rows from its own
      key and takes floor(T_train / batch_size) minibatches of it.
    """
    num_batches = num_train // batch_size
    optimizer = make_optimizer(learning_rate, halving_epochs, num_batches)

    def member_epoch(params, opt_state, train: Batch, key):
        order = jax.random.permutation(key, num_train)[: num_batches * batch_size]

        def step(carry, index):
            params, opt_state = carry
            batch = jax.tree.map(lambda x: x[index], train)
            loss, grads = jax.value_and_grad(loss_fn)(params, config, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), order.reshape(num_batches, batch_size))
        return params, opt_state, jnp.mean(losses)

    def member_validation(params, chunks: Batch):
        def chunk_sums(chunk):
            pred = model_lib.apply(params, config, chunk.agent_id, chunk.obs, chunk.action)
            per_row = jnp.mean(jnp.square(pred - chunk.target), axis=-1)
            return jnp.sum(per_row * chunk.weight), jnp.sum(chunk.weight)

        errors, counts = jax.lax.map(chunk_sums, chunks)
        return jnp.sum(errors) / jnp.maximum(jnp.sum(counts), 1.0)

    @jax.jit
    def epoch(state: TrainState, train: Batch, validation: Batch, key: jax.Array):
        ensemble_size = state.best_loss.shape[0]
        keys = jax.random.split(key, ensemble_size)
        params, opt_state, train_loss = jax.vmap(member_epoch, in_axes=(0, 0, None, 0))(
            state.params, state.opt_state, train, keys)
        if has_validation:
            validation_loss = jax.vmap(member_validation, in_axes=(0, None))(params, validation)
            improved = validation_loss < state.best_loss
        else:
            validation_loss = jnp.full((ensemble_size,), jnp.nan, jnp.float32)
            improved = jnp.ones((ensemble_size,), bool)

        def keep_best(new, old):
            return jnp.where(improved.reshape(-1, *([1] * (new.ndim - 1))), new, old)

        best_params = jax.tree.map(keep_best, params, state.best_params)
        best_loss = jnp.where(improved, validation_loss, state.best_loss)
        return (TrainState(params, opt_state, best_params, best_loss), train_loss,
                validation_loss)

    return epoch


def _fit_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    split_key, init_key, shuffle_key = jax.random.split(key, 3)
    return split_key, init_key, shuffle_key


def validation_split(key: jax.Array, num_transitions: int,
                     validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The train / validation split that `fit(..., key=key)` uses.

    A uniformly random `validation_fraction` of all transitions (so it cuts
    across trajectories), the same for every ensemble member and every
    candidate rank.

    Returns:
      (train_index, validation_index): sorted int arrays partitioning
      0..num_transitions-1.
    """
    num_validation = int(round(validation_fraction * num_transitions))
    order = np.asarray(jax.random.permutation(_fit_keys(key)[0], num_transitions))
    return np.sort(order[num_validation:]), np.sort(order[:num_validation])


# ---------------------------------------------------------------------------
# fit


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How `fit` trains an ensemble (validated at construction; hashable).

    Attributes:
      rank: the number of latent factors r, or "auto" to pick the rank with
        the lowest mean validation loss among `rank_candidates` (one ensemble
        is trained per candidate).
      ensemble_size: M members, differing in initialisation and batch order.
      epochs: passes over the training transitions.
      batch_size: minibatch size (clamped to the number of training
        transitions); the last partial minibatch of an epoch is dropped.
      learning_rate: Adam's (initial) step size.
      lr_halving_epochs: halve the step size every this many epochs (the
        authors' code: 150); None keeps it constant.
      validation_fraction: share of transitions held out (random across
        trajectories). Each member keeps the parameters of its best validation
        epoch. 0 trains on everything and keeps the last parameters.
      state_hidden: hidden sizes of the state encoder ((256,) for
        MountainCar/CartPole, (256, 512, 512) for HalfCheetah; the paper's
        sizes per env are in `experiments.paper.MODEL_SIZES`).
      action_hidden: hidden sizes of the continuous action encoder (ignored
        for discrete actions).
      rank_candidates: ranks tried by rank="auto".
      standardize: standardise inputs and Δ targets with training statistics
        (default); False trains on raw values.
    """

    rank: int | str
    ensemble_size: int = 5
    epochs: int = 300
    batch_size: int = 256
    learning_rate: float = 1e-3
    lr_halving_epochs: int | None = None
    validation_fraction: float = 0.2
    state_hidden: tuple[int, ...] = (256,)
    action_hidden: tuple[int, ...] = (256, 256)
    rank_candidates: tuple[int, ...] = RANK_CANDIDATES
    standardize: bool = True

    def __post_init__(self):
        if isinstance(self.rank, str):
            if self.rank != "auto":
                raise ValueError(f"rank: an integer or 'auto'; got {self.rank!r}")
            if self.validation_fraction <= 0:
                raise ValueError("validation_fraction: rank='auto' selects by validation loss; "
                                 "it needs validation_fraction > 0")
            if not tuple(self.rank_candidates):
                raise ValueError("rank_candidates: empty")
            for r in self.rank_candidates:
                positive_int("rank_candidates", r)
        else:
            positive_int("rank", self.rank)
        for name in ("ensemble_size", "epochs", "batch_size"):
            positive_int(name, getattr(self, name))
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate: must be a positive number; got "
                             f"{self.learning_rate!r}")
        if self.lr_halving_epochs is not None and not (
                isinstance(self.lr_halving_epochs, (int, np.integer))
                and self.lr_halving_epochs > 0):
            raise ValueError(f"lr_halving_epochs: must be a positive integer or None; got "
                             f"{self.lr_halving_epochs!r}")
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ValueError(f"validation_fraction: must be in [0, 1); got "
                             f"{self.validation_fraction!r}")
        # Plain Python values (lists from JSON become tuples), so that the
        # config hashes and `dataclasses.asdict` is JSON-able.
        fields = dict(
            rank=self.rank if isinstance(self.rank, str) else int(self.rank),
            ensemble_size=int(self.ensemble_size), epochs=int(self.epochs),
            batch_size=int(self.batch_size), learning_rate=float(self.learning_rate),
            lr_halving_epochs=(None if self.lr_halving_epochs is None
                               else int(self.lr_halving_epochs)),
            validation_fraction=float(self.validation_fraction),
            state_hidden=tuple(int(h) for h in self.state_hidden),
            action_hidden=tuple(int(h) for h in self.action_hidden),
            rank_candidates=tuple(int(r) for r in self.rank_candidates),
            standardize=bool(self.standardize))
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks `fit` trains: the candidates for "auto", else the rank."""
        return self.rank_candidates if self.rank == "auto" else (self.rank,)


def fit(
    transitions: Transitions,
    config: TrainConfig | None = None,
    *,
    key: jax.Array,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    callback: Callable[[EpochMetrics], None] | None = None,
    progress: bool = True,
    **fields,
) -> Simulator:
    """Learns one personalised simulator per agent, as an ensemble of M.

        simulator = fit(transitions, TrainConfig(rank=5, epochs=300), key=key)
        simulator = fit(transitions, rank=5, epochs=300, key=key)     # the same

    Args:
      transitions: the offline data (validated again here).
      config: how to train (`TrainConfig`); keyword `fields` build one, or
        replace fields of `config`.
      key: PRNG key; the same key gives the same simulator, interrupted or not.
      checkpoint_dir: if given, orbax checkpoints are written to
        `<checkpoint_dir>/rank_<r>/` every `checkpoint_every` epochs and after
        the last one; a later call with the same data, key and config
        resumes from the latest one (and ends with the same parameters as an
        uninterrupted run; `epochs` may be raised to train further). A
        directory holding a different run is refused.
      checkpoint_every: K, epochs between checkpoints.
      callback: called with `EpochMetrics` after every epoch (after any
        checkpoint of that epoch is written).
      progress: show a tqdm progress bar with the validation loss.
      **fields: `TrainConfig` fields.

    Returns:
      Simulator with the members' best-validation parameters; with
      rank="auto", the best rank's, its `rank_losses` listing every candidate.

    Raises:
      ValueError: bad data (see `data.validate_transitions`) or config, or a
        checkpoint directory holding a different run.
    """
    validate_transitions(transitions)
    config = TrainConfig(**fields) if config is None else dataclasses.replace(config, **fields)
    positive_int("checkpoint_every", checkpoint_every)
    num_train_rows = len(validation_split(key, transitions.num_transitions,
                                          config.validation_fraction)[0])
    if num_train_rows < 1:
        raise ValueError(f"validation_fraction: {config.validation_fraction} leaves no "
                         f"training transitions out of {transitions.num_transitions}")
    results = [_fit_rank(transitions, config, rank, key,
                         checkpoint_dir=checkpoint_dir, checkpoint_every=int(checkpoint_every),
                         callback=callback, progress=progress)
               for rank in config.ranks]
    if len(results) == 1:
        return results[0]
    losses = [float(np.mean(np.asarray(sim.validation_loss))) for sim in results]
    best = int(np.argmin(losses))
    return results[best].replace(
        rank_losses=tuple((r, loss) for r, loss in zip(config.ranks, losses)))


def _fit_rank(transitions: Transitions, config: TrainConfig, rank: int, key: jax.Array, *,
              checkpoint_dir, checkpoint_every: int, callback, progress: bool) -> Simulator:
    """fit() for one rank."""
    model_config = ModelConfig(
        num_agents=transitions.num_agents, obs_dim=transitions.obs_dim, rank=rank,
        num_actions=transitions.num_actions, action_dim=transitions.action_dim,
        state_hidden=config.state_hidden, action_hidden=config.action_hidden)
    _, init_key, shuffle_key = _fit_keys(key)
    train_index, validation_index = validation_split(key, transitions.num_transitions,
                                                     config.validation_fraction)
    stats = _norm_stats(transitions, train_index, config.standardize)
    train = make_batch(transitions, stats, train_index)
    has_validation = len(validation_index) > 0
    validation = chunk_batch(make_batch(transitions, stats, validation_index if has_validation
                                        else train_index[:1]),
                             min(VALIDATION_CHUNK, max(1, len(validation_index))))
    batch_size = min(config.batch_size, len(train_index))
    epoch_fn = make_epoch_fn(model_config, config.learning_rate, batch_size, len(train_index),
                             has_validation, config.lr_halving_epochs)
    optimizer = make_optimizer(config.learning_rate, config.lr_halving_epochs,
                               len(train_index) // batch_size)
    state = init_train_state(init_key, model_config, config.ensemble_size, optimizer)

    run = (_run_description(transitions, model_config, config, key, batch_size)
           if checkpoint_dir is not None else None)
    state = _train_epochs(state, epoch_fn, train, validation, shuffle_key, rank=rank,
                          epochs=config.epochs, checkpoint_dir=checkpoint_dir, run=run,
                          checkpoint_every=checkpoint_every, callback=callback,
                          progress=progress)
    best_loss = (state.best_loss if has_validation
                 else jnp.full((config.ensemble_size,), jnp.nan))
    return Simulator(params=state.best_params, stats=stats, validation_loss=best_loss,
                     config=model_config, agent_keys=transitions.agent_keys)


def _norm_stats(transitions: Transitions, train_index: np.ndarray, standardize: bool
                ) -> NormStats:
    """The training split's statistics, or the identity without standardisation."""
    if not standardize:
        return model_lib.identity_stats(transitions.obs_dim, transitions.action_dim)
    return model_lib.compute_stats(
        np.asarray(transitions.obs)[train_index], np.asarray(transitions.action)[train_index],
        np.asarray(transitions.next_obs)[train_index], discrete=transitions.discrete)


def _train_epochs(state: TrainState, epoch_fn, train: Batch, validation: Batch,
                  shuffle_key: jax.Array, *, rank: int, epochs: int, checkpoint_dir,
                  run: dict | None, checkpoint_every: int, callback, progress: bool
                  ) -> TrainState:
    """The epochs of one rank on `training.run_loop`: resumes from the latest
    checkpoint in `<checkpoint_dir>/rank_<r>`, checkpoints every K epochs and
    after the last, reports `EpochMetrics`."""
    def step(state: TrainState, epoch: int, length: int):
        del length                                        # one epoch per call
        state, train_loss, validation_loss = epoch_fn(
            state, train, validation, jax.random.fold_in(shuffle_key, epoch))
        return state, EpochMetrics(rank=rank, epoch=epoch + 1, num_epochs=epochs,
                                   train_loss=np.asarray(train_loss),
                                   validation_loss=np.asarray(validation_loss),
                                   best_validation_loss=np.asarray(state.best_loss))

    directory = (None if checkpoint_dir is None
                 else os.path.join(os.fspath(checkpoint_dir), f"rank_{rank}"))
    state, _ = training.run_loop(
        state, step, num_steps=epochs, checkpoint_dir=directory, run_description=run,
        checkpoint_every=checkpoint_every, unit="epoch", desc=f"fit rank {rank}",
        progress=progress, callback=callback,
        postfix=lambda metrics: dict(train=f"{metrics.train_loss.mean():.4g}",
                                     val=f"{metrics.validation_loss.mean():.4g}"))
    return state


def _run_description(transitions: Transitions, model_config: ModelConfig,
                     config: TrainConfig, key, batch_size: int) -> dict:
    """What must match for a checkpoint to be resumed (JSON-able): the data's
    digest, the network, the key and the training config (`epochs` aside:
    a run may be resumed to train further)."""
    # The network's sizes are in "model"; the rank of this checkpoint too.
    training = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in ("epochs", "rank", "rank_candidates", "state_hidden",
                             "action_hidden")}
    return {
        "format": CHECKPOINT_FORMAT,
        "model": jsonable(model_config.to_dict()),
        **training,
        "batch_size": batch_size,
        "key": checkpoints.key_list(key),
        "data_sha256": checkpoints.data_digest((transitions.obs, transitions.action,
                                                transitions.next_obs, transitions.agent_id)),
    }

