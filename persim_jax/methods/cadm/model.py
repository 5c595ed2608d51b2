"""CaDM's networks, config, saved model, training pairs and loss (`persim_jax.methods.cadm`).

The pure core of the CaDM baselines: `CaDMConfig` (and the paper's `VANILLA`,
`PE_TS`), the context encoder and forward / backward models on
`persim_jax.networks` (the authors' truncated-normal init, stored as
{"layer_i": {"w", "b"}}), `CaDMModel` (what training returns and saves), the
(context anchor, transition) pairs it trains on and its loss. Training,
evaluation (`dynamics`) and the harness's methods (`method`) are beside it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from persim_jax import networks
from persim_jax.validation import positive_int
from persim_jax.data import Transitions, jsonable, load_msgpack, save_msgpack

FILE_FORMAT = "persim-jax-cadm"

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
        return jsonable(dataclasses.asdict(self))


# The paper's two CaDM rows (appendix D.2: 100 iterations).
VANILLA = CaDMConfig()
PE_TS = CaDMConfig(ensemble_size=5, probabilistic=True, particles=20)


# ---------------------------------------------------------------------------
# Networks: `persim_jax.networks` MLPs, stored as plain dicts
# {"layer_i": {"w", "b"}} (the saved files' names), every leaf with a leading
# member axis once stacked.


def _kernel_init(fan_in: int):
    # The authors' init: truncated normal (±2σ), σ = 1 / (2 √fan_in); zero bias.
    std = 1.0 / (2.0 * math.sqrt(fan_in))

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return init


def _stored(layer: dict) -> dict:
    """A `networks` layer under CaDM's names."""
    return {"w": layer["kernel"], "b": layer["bias"]}


def _layer(stored: dict) -> dict:
    """CaDM's {"w", "b"} layer as a `networks` layer."""
    return {"kernel": stored["w"], "bias": stored["b"]}


def _dense(key, fan_in: int, fan_out: int) -> dict:
    return _stored(networks.init_dense(key, fan_in, fan_out, _kernel_init))


def _init_mlp(key, sizes: Sequence[int]) -> dict:
    layers = networks.init_mlp(key, sizes, _kernel_init)
    return {f"layer_{i}": _stored(layer) for i, layer in enumerate(layers)}


def _layers(params: dict) -> list[dict]:
    """The `networks` layers of a {"layer_i"} network, input to output."""
    return [_layer(params[f"layer_{i}"]) for i in range(len(params))]


def _weight_decay(params: dict, last: float) -> jax.Array:
    """Σ_l λ_l ½‖W_l‖² of one network; `last`: λ of its output layer."""
    layers = _layers(params)
    total = jnp.zeros((), jnp.float32)
    for index, layer in enumerate(layers):
        rate = (last if index == len(layers) - 1
                else min(WEIGHT_DECAY_STEP * (index + 1), WEIGHT_DECAY_MAX))
        total = total + rate * 0.5 * jnp.sum(layer["kernel"] ** 2)
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
    return networks.mlp(_layers(encoder), history, jax.nn.relu)


def _trunk(trunk: dict, x: jax.Array) -> jax.Array:
    """Every layer swish: the heads are separate."""
    return networks.mlp(_layers(trunk), x, jax.nn.swish, activate_output=True)


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
    mean = networks.dense(_layer(member["forward"]["mean"]), h)
    logvar = networks.dense(_layer(member["forward"]["logvar"]), h)
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


def gather_history(data: PairData, anchors: jax.Array) -> jax.Array:
    """(B, K·(D + A)) flattened context histories of the anchor rows (B,)."""
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
    context = encode_context(member["encoder"], gather_history(data, anchor))
    obs, action, next_obs = data.obs[target], data.action[target], data.next_obs[target]
    y = (next_obs - obs - stats.delta_mean) / stats.delta_std
    mean, logvar = forward_heads(member, bounds, stats, obs, action, context)
    if config.probabilistic:
        forward = jnp.mean((mean - y) ** 2 * jnp.exp(-logvar)) + jnp.mean(logvar)
    else:
        forward = jnp.mean((mean - y) ** 2)
    h = _trunk(member["backward"]["trunk"], _model_input(stats, next_obs, action, context))
    back = networks.dense(_layer(member["backward"]["mean"]), h)
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
