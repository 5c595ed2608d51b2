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
iteration, and resumable checkpoints after each iteration.

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
import math
import os
from typing import Any, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from persim_jax import checkpoints, planning
from persim_jax._validate import positive_int
from persim_jax.data import Transitions, load_msgpack, save_msgpack, validate_transitions
from persim_jax.methods import Method

FILE_FORMAT = "persim-jax-cadm"
CHECKPOINT_FORMAT = 1

# Weight decay of hidden layer l (0-based): min(2.5e-5 · (l + 1), 7.5e-5), as
# the authors' 2.5e-5, 5e-5, 7.5e-5, 7.5e-5; the encoder's output layer
# 7.5e-5, the forward and backward heads 1e-4.
WEIGHT_DECAY_STEP = 2.5e-5
WEIGHT_DECAY_MAX = 7.5e-5
HEAD_WEIGHT_DECAY = 1e-4
# Soft bounds of the PE heads' log-variance: trainable, initialised here,
# and their regulariser's weight.
MAX_LOGVAR_INIT = 0.5
MIN_LOGVAR_INIT = -10.0
LOGVAR_BOUND_WEIGHT = 0.01
# The stop rule: a rolling mean of the validation loss, ρ = 0.99, started at
# 1.5 × the first value (÷ 1.5 when negative); a fit stops when it rises.
STOP_RHO = 0.99
STOP_START = 1.5
EPSILON = 1e-10


# ---------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class CaDMConfig:
    """How CaDM trains and plans (validated at construction; hashable).

    Attributes:
      ensemble_size: E members (Vanilla 1, PE-TS 5, each on its own bootstrap
        resample when E > 1).
      probabilistic: Gaussian heads trained by NLL (PE) or deterministic means
        trained by squared error (Vanilla).
      particles: P trajectories per candidate when planning, a multiple of E;
        particle p keeps member p // (P / E) (TS-∞). Vanilla 1, PE-TS 20.
      history: K, transitions in the context.
      future: F, transitions after an anchor predicted from its context.
      context_dim: size of c.
      hidden: hidden sizes of the forward and backward models.
      encoder_hidden: hidden sizes of the context encoder.
      back_coeff: weight β of the backward model's loss.
      learning_rate: Adam's step size.
      batch_size: minibatch per member.
      iterations: fits (paper: 100).
      epochs: most epochs per fit (CaDM: 5), fewer when the stop rule fires.
      pairs_per_epoch: None: an epoch is every training pair (each
        (context, transition) pair, ≈ F × the transitions); a number: the
        first that many of each epoch's shuffled pairs (a cheaper epoch).
      validation_fraction, max_validation: each fit's validation split.
    """

    ensemble_size: int = 1
    probabilistic: bool = False
    particles: int = 1
    history: int = 10
    future: int = 10
    context_dim: int = 10
    hidden: tuple[int, ...] = (200, 200, 200, 200)
    encoder_hidden: tuple[int, ...] = (256, 128, 64)
    back_coeff: float = 0.5
    learning_rate: float = 1e-3
    batch_size: int = 256
    iterations: int = 100
    epochs: int = 5
    pairs_per_epoch: int | None = None
    validation_fraction: float = 0.1
    max_validation: int = 5000

    def __post_init__(self):
        for name in ("ensemble_size", "particles", "history", "future", "context_dim",
                     "batch_size", "iterations", "epochs", "max_validation"):
            positive_int(name, getattr(self, name))
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.pairs_per_epoch is not None:
            positive_int("pairs_per_epoch", self.pairs_per_epoch)
            object.__setattr__(self, "pairs_per_epoch", int(self.pairs_per_epoch))
        if self.particles % self.ensemble_size:
            raise ValueError(f"particles: must be a multiple of ensemble_size="
                             f"{self.ensemble_size}; got {self.particles}")
        if not isinstance(self.probabilistic, (bool, np.bool_)):
            raise ValueError(f"probabilistic: must be True or False; got {self.probabilistic!r}")
        object.__setattr__(self, "probabilistic", bool(self.probabilistic))
        for name in ("hidden", "encoder_hidden"):
            sizes = getattr(self, name)
            if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__") or not sizes:
                raise ValueError(f"{name}: a non-empty sequence of layer sizes; got {sizes!r}")
            for size in sizes:
                positive_int(name, size)
            object.__setattr__(self, name, tuple(int(s) for s in sizes))
        for name, value in (("back_coeff", self.back_coeff),
                            ("learning_rate", self.learning_rate)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0; got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0; got {self.learning_rate!r}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction: must be in (0, 1); got "
                             f"{self.validation_fraction!r}")

    def to_dict(self) -> dict:
        """JSON-able fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


# The paper's two CaDM rows (appendix D.2: 100 iterations).
VANILLA = CaDMConfig()
PE_TS = CaDMConfig(ensemble_size=5, probabilistic=True, particles=20)


# ---------------------------------------------------------------------------
# Networks: plain dicts {"layer_i": {"w", "b"}}, every leaf with a leading
# member axis once stacked.


def _dense(key, fan_in: int, fan_out: int) -> dict:
    # The authors' init: truncated normal (±2σ), σ = 1 / (2 √fan_in); zero bias.
    std = 1.0 / (2.0 * math.sqrt(fan_in))
    w = std * jax.random.truncated_normal(key, -2.0, 2.0, (fan_in, fan_out), jnp.float32)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def _init_mlp(key, sizes: Sequence[int]) -> dict:
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"layer_{i}": _dense(keys[i], sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)}


def _layers(params: dict) -> list[dict]:
    return [params[f"layer_{i}"] for i in range(len(params))]


def _mlp(params: dict, x: jax.Array, activation) -> jax.Array:
    """Hidden layers with `activation`, the last one linear."""
    layers = _layers(params)
    for layer in layers[:-1]:
        x = activation(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def _weight_decay(params: dict, last: float) -> jax.Array:
    """Σ_l λ_l ½‖W_l‖² of one network; `last`: λ of its output layer."""
    layers = _layers(params)
    total = jnp.zeros((), jnp.float32)
    for index, layer in enumerate(layers):
        rate = (last if index == len(layers) - 1
                else min(WEIGHT_DECAY_STEP * (index + 1), WEIGHT_DECAY_MAX))
        total = total + rate * 0.5 * jnp.sum(layer["w"] ** 2)
    return total


class Stats(NamedTuple):
    """z-score statistics (population std + 1e-10) over all transitions."""

    obs_mean: jax.Array      # (D,)
    obs_std: jax.Array
    delta_mean: jax.Array    # (D,) of s' - s; the backward target s - s' has the negated mean
    delta_std: jax.Array
    action_mean: jax.Array   # (A,) continuous actions; () zeros for discrete ones
    action_std: jax.Array


@struct.dataclass
class CaDMModel:
    """A trained CaDM: parameters of E members, statistics and sizes.

    Attributes:
      params: {"encoder", "forward", "backward"} networks with a leading E
        axis; {"max_logvar", "min_logvar"} (1, D) shared bounds of the PE heads.
      stats: `Stats`.
      config: the `CaDMConfig` it was trained with.
      obs_dim: D.
      num_actions: discrete actions, or None for continuous ones.
      action_dim: A of continuous actions, or None.
      validation_loss: (E,) each member's loss on the last fit's validation split.
    """

    params: Any
    stats: Stats
    validation_loss: jax.Array
    config: CaDMConfig = struct.field(pytree_node=False)
    obs_dim: int = struct.field(pytree_node=False)
    num_actions: int | None = struct.field(pytree_node=False, default=None)
    action_dim: int | None = struct.field(pytree_node=False, default=None)

    @property
    def action_size(self) -> int:
        """Width of an encoded action: one-hot size or A."""
        return self.num_actions if self.num_actions is not None else self.action_dim

    def save(self, path: str | os.PathLike) -> None:
        """Writes one msgpack file atomically."""
        payload = {"format": FILE_FORMAT, "config": self.config.to_dict(),
                   "obs_dim": self.obs_dim, "num_actions": self.num_actions,
                   "action_dim": self.action_dim,
                   "params": jax.tree.map(np.asarray, self.params),
                   "stats": {k: np.asarray(v) for k, v in self.stats._asdict().items()},
                   "validation_loss": np.asarray(self.validation_loss)}
        save_msgpack(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CaDMModel":
        payload = load_msgpack(path, FILE_FORMAT, "a CaDM model file")
        return cls(params=jax.tree.map(jnp.asarray, payload["params"]),
                   stats=Stats(**{k: jnp.asarray(v) for k, v in payload["stats"].items()}),
                   validation_loss=jnp.asarray(payload["validation_loss"]),
                   config=CaDMConfig(**payload["config"]), obs_dim=int(payload["obs_dim"]),
                   num_actions=payload["num_actions"], action_dim=payload["action_dim"])


def encode_actions(action: jax.Array, num_actions: int | None) -> jax.Array:
    """(..., nA) one-hot of discrete actions, or continuous ones as float32."""
    if num_actions is not None:
        return jax.nn.one_hot(action, num_actions, dtype=jnp.float32)
    return jnp.asarray(action, jnp.float32)


def init_params(key, config: CaDMConfig, obs_dim: int, action_size: int) -> dict:
    """Parameters of E members (leading axis) and the shared log-variance bounds."""
    history_in = config.history * (obs_dim + action_size)
    model_in = obs_dim + action_size + config.context_dim

    def member(key):
        keys = jax.random.split(key, 5)
        trunk = (model_in, *config.hidden)
        return {
            "encoder": _init_mlp(keys[0], (history_in, *config.encoder_hidden,
                                           config.context_dim)),
            "forward": {"trunk": _init_mlp(keys[1], trunk),
                        "mean": _dense(keys[2], config.hidden[-1], obs_dim),
                        "logvar": _dense(keys[3], config.hidden[-1], obs_dim)},
            "backward": {"trunk": _init_mlp(keys[4], trunk),
                         "mean": _dense(jax.random.fold_in(keys[4], 1), config.hidden[-1],
                                        obs_dim)},
        }

    members = jax.vmap(member)(jax.random.split(key, config.ensemble_size))
    return {"members": members,
            "max_logvar": jnp.full((1, obs_dim), MAX_LOGVAR_INIT, jnp.float32),
            "min_logvar": jnp.full((1, obs_dim), MIN_LOGVAR_INIT, jnp.float32)}


def encode_context(encoder: dict, history: jax.Array) -> jax.Array:
    """(..., C) context of (..., K·(D + A)) flattened histories (one member)."""
    return _mlp(encoder, history, jax.nn.relu)


def _trunk(trunk: dict, x: jax.Array) -> jax.Array:
    """Every layer swish: the heads are separate."""
    for layer in _layers(trunk):
        x = jax.nn.swish(x @ layer["w"] + layer["b"])
    return x


def _model_input(stats: Stats, obs, action_in, context):
    obs_in = (obs - stats.obs_mean) / stats.obs_std
    action_in = (action_in - stats.action_mean) / stats.action_std
    return jnp.concatenate([obs_in, action_in, context], axis=-1)


def _bounded_logvar(logvar, max_logvar, min_logvar):
    logvar = max_logvar - jax.nn.softplus(max_logvar - logvar)
    return min_logvar + jax.nn.softplus(logvar - min_logvar)


def forward_heads(member: dict, bounds: tuple, stats: Stats, obs, action_in, context):
    """One member's forward model: (mean, log-variance) of the z-scored Δ,
    each (..., D)."""
    h = _trunk(member["forward"]["trunk"], _model_input(stats, obs, action_in, context))
    mean = h @ member["forward"]["mean"]["w"] + member["forward"]["mean"]["b"]
    logvar = h @ member["forward"]["logvar"]["w"] + member["forward"]["logvar"]["b"]
    return mean, _bounded_logvar(logvar, *bounds)


# ---------------------------------------------------------------------------
# Training data: (context anchor, transition) pairs


class PairData(NamedTuple):
    """The training arrays (device), rows in path order.

    obs, next_obs (T, D); action (T, A) encoded; delta (T, D) raw s' - s;
    history (T, K) row index of each context slot of anchor t, -1 for an
    empty slot; pairs (P, 2) (anchor row, target row)."""

    obs: jax.Array
    action: jax.Array
    next_obs: jax.Array
    delta: jax.Array
    history: jax.Array
    pairs: jax.Array


def path_rows(transitions: Transitions) -> tuple[np.ndarray, np.ndarray]:
    """(row order (T,), path start flags (T,)): each agent's rows in the
    order given (a trajectory's steps in time order), a new path at the
    agent's first row, after a done or timeout, and wherever next_obs of a
    row is not the obs of the next (a gap)."""
    agent = np.asarray(transitions.agent_id)
    order = np.argsort(agent, kind="stable")
    obs = np.asarray(transitions.obs)[order]
    next_obs = np.asarray(transitions.next_obs)[order]
    ended = (np.asarray(transitions.done) | np.asarray(transitions.timeout))[order]
    start = np.ones(order.shape, bool)
    if order.size > 1:
        same_agent = agent[order][1:] == agent[order][:-1]
        continues = np.all(np.isclose(next_obs[:-1], obs[1:], rtol=1e-5, atol=1e-6), axis=1)
        start[1:] = ~(same_agent & continues & ~ended[:-1])
    return order, start


def history_index(start: np.ndarray, history: int) -> np.ndarray:
    """(T, K) rows of each anchor's context slots, oldest first, -1 empty: at
    path step t, slots 0..min(t, K)-1 hold rows t - min(t, K) .. t - 1."""
    rows = np.arange(start.size)
    path_start = np.maximum.accumulate(np.where(start, rows, 0))
    step = rows - path_start
    filled = np.minimum(step, history)
    slot = np.arange(history)
    index = rows[:, None] - filled[:, None] + slot[None, :]
    return np.where(slot[None, :] < filled[:, None], index, -1).astype(np.int32)


def pair_index(start: np.ndarray, future: int) -> np.ndarray:
    """(P, 2) (anchor, target) rows: target = anchor + j, j < F, same path."""
    rows = np.arange(start.size)
    path_id = np.cumsum(start) - 1
    out = []
    for j in range(future):
        anchor = rows[:rows.size - j] if j else rows
        target = anchor + j
        ok = path_id[anchor] == path_id[target]
        out.append(np.stack([anchor[ok], target[ok]], axis=1))
    return np.concatenate(out).astype(np.int32)


def pair_data(transitions: Transitions, config: CaDMConfig) -> PairData:
    order, start = path_rows(transitions)
    obs = np.asarray(transitions.obs, np.float32)[order]
    next_obs = np.asarray(transitions.next_obs, np.float32)[order]
    action = np.asarray(encode_actions(np.asarray(transitions.action)[order],
                                       transitions.num_actions))
    return PairData(jnp.asarray(obs), jnp.asarray(action), jnp.asarray(next_obs),
                    jnp.asarray(next_obs - obs), jnp.asarray(history_index(start, config.history)),
                    jnp.asarray(pair_index(start, config.future)))


def compute_stats(data: PairData, discrete: bool) -> Stats:
    obs, delta = np.asarray(data.obs, np.float64), np.asarray(data.delta, np.float64)
    if discrete:
        action_mean = np.zeros(data.action.shape[-1])
        action_std = np.ones(data.action.shape[-1])
    else:
        action = np.asarray(data.action, np.float64)
        action_mean, action_std = action.mean(0), action.std(0) + EPSILON
    as32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return Stats(as32(obs.mean(0)), as32(obs.std(0) + EPSILON), as32(delta.mean(0)),
                 as32(delta.std(0) + EPSILON), as32(action_mean), as32(action_std))


def flat_history(deltas: jax.Array, actions: jax.Array) -> jax.Array:
    """(..., K·(D + A)): all K Δs, then all K actions (the authors' order)."""
    lead = deltas.shape[:-2]
    return jnp.concatenate([deltas.reshape(*lead, -1), actions.reshape(*lead, -1)], axis=-1)


def _gather_history(data: PairData, anchors: jax.Array) -> jax.Array:
    slots = data.history[anchors]                                  # (B, K)
    filled = (slots >= 0)[..., None]
    deltas = jnp.where(filled, data.delta[jnp.maximum(slots, 0)], 0.0)
    actions = jnp.where(filled, data.action[jnp.maximum(slots, 0)], 0.0)
    return flat_history(deltas, actions)


# ---------------------------------------------------------------------------
# Loss and training programs


def member_loss(member: dict, bounds: tuple, stats: Stats, config: CaDMConfig, data: PairData,
                index: jax.Array, with_decay: bool = True) -> jax.Array:
    """() loss of one member on the pairs `index` (B,): forward + β backward
    (+ weight decay)."""
    anchor, target = data.pairs[index, 0], data.pairs[index, 1]
    context = encode_context(member["encoder"], _gather_history(data, anchor))
    obs, action, next_obs = data.obs[target], data.action[target], data.next_obs[target]
    y = (next_obs - obs - stats.delta_mean) / stats.delta_std
    mean, logvar = forward_heads(member, bounds, stats, obs, action, context)
    if config.probabilistic:
        forward = jnp.mean((mean - y) ** 2 * jnp.exp(-logvar)) + jnp.mean(logvar)
    else:
        forward = jnp.mean((mean - y) ** 2)
    h = _trunk(member["backward"]["trunk"], _model_input(stats, next_obs, action, context))
    back = h @ member["backward"]["mean"]["w"] + member["backward"]["mean"]["b"]
    y_back = (obs - next_obs + stats.delta_mean) / stats.delta_std
    loss = forward + config.back_coeff * jnp.mean((back - y_back) ** 2)
    if with_decay:
        loss = loss + (_weight_decay(member["encoder"], WEIGHT_DECAY_MAX)
                       + _weight_decay(member["forward"]["trunk"], 0.0)
                       + _weight_decay(member["backward"]["trunk"], 0.0)
                       + HEAD_WEIGHT_DECAY * 0.5 * (
                           jnp.sum(member["forward"]["mean"]["w"] ** 2)
                           + jnp.sum(member["forward"]["logvar"]["w"] ** 2)
                           + jnp.sum(member["backward"]["mean"]["w"] ** 2)))
    return loss


def total_loss(params: dict, stats: Stats, config: CaDMConfig, data: PairData,
               index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ over members + the bounds' regulariser, per-member losses (E,));
    index (E, B): each member's pairs."""
    bounds = (params["max_logvar"], params["min_logvar"])
    losses = jax.vmap(member_loss, in_axes=(0, None, None, None, None, 0))(
        params["members"], bounds, stats, config, data, index)
    total = jnp.sum(losses)
    if config.probabilistic:
        total = total + LOGVAR_BOUND_WEIGHT * (jnp.sum(params["max_logvar"])
                                               - jnp.sum(params["min_logvar"]))
    return total, losses


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

    manager = run = None
    start, bar = 0, None
    try:
        if checkpoint_dir is not None:
            run = _run_description(data, config, key)
            manager = checkpoints.manager(checkpoint_dir)
            state, start = checkpoints.restore_latest(manager, state, run,
                                                      total=config.iterations, unit="iteration")
        bar = tqdm(total=config.iterations, initial=start, disable=not progress,
                   desc=f"cadm (E={ensemble})", unit="it", leave=False)
        for iteration in range(start, config.iterations):
            state = _fit_once(state, stats, data, jax.random.fold_in(run_key, iteration),
                              config, num_validation, steps, batch, epoch_program, validate)
            if manager is not None:
                checkpoints.save(manager, iteration + 1, state, run, force=True)
            bar.update(1)
            bar.set_postfix(val=f"{float(np.mean(state.validation_loss)):.4g}")
    finally:
        if bar is not None:
            bar.close()
        checkpoints.close(manager)
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
