"""The factorised personalised simulator of PerSim (section 5, appendix D.1).

For agent n, state s and action a, the change of state coordinate d is

    Δŝ_d = Σ_ℓ u_ℓ(n) · v_ℓ(s, d) · w_ℓ(a),        ℓ = 1..r          (paper, §5)

with three networks that share no edges:
  * agent encoder g_u: one linear layer on the one-hot agent id -> r;
  * state encoder g_v: an MLP -> D×r (reshaped row-major to (D, r), as the
    authors' code);
  * action encoder g_w: one linear layer on the one-hot action (discrete) or an
    MLP (continuous) -> r.
The next state is s + Δŝ.

Inputs (state, continuous action) and the Δ targets are standardised with
training-set statistics (`NormStats`); the network works in that standardised
space and `predict_next_obs` maps back to raw units.

Initialisation follows PyTorch's `nn.Linear` default, as the authors' code:
kernel and bias ~ U(±1/√fan_in). A one-hot linear layer is computed as a row
lookup `kernel[index] + bias`, which is the same function (and gradient) as a
dense layer applied to the one-hot vector, without the N-wide matmul.

The MLPs are `persim_jax.networks`' (the one implementation of the project);
`persim_jax.persim.simulator.Simulator` bundles an ensemble of M networks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from persim_jax import networks
from persim_jax.networks import MLP, torch_uniform

Params = Any

# Smallest standard deviation used to standardise a dimension: a constant
# dimension (std 0) is then centred but not blown up.
STD_EPS = 1e-6

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of the network (hashable: a jit static argument).

    Attributes:
      num_agents: N, the size of the agent one-hot.
      obs_dim: D, the state dimension.
      rank: r, the number of latent factors.
      num_actions: number of discrete actions, or None for continuous actions.
      action_dim: A, the continuous action dimension (None when discrete).
      state_hidden: hidden layer sizes of the state encoder.
      action_hidden: hidden layer sizes of the continuous action encoder
        (ignored for discrete actions: one linear layer on the one-hot, as the
        paper).
    """

    num_agents: int
    obs_dim: int
    rank: int
    num_actions: int | None = None
    action_dim: int | None = None
    state_hidden: tuple[int, ...] = (256,)
    action_hidden: tuple[int, ...] = (256, 256)

    def __post_init__(self):
        # Lists from JSON become tuples so that the config stays hashable.
        object.__setattr__(self, "state_hidden", tuple(int(h) for h in self.state_hidden))
        object.__setattr__(self, "action_hidden", tuple(int(h) for h in self.action_hidden))
        for name in ("num_agents", "obs_dim", "rank"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: must be a positive integer; got {value!r}")
        if (self.num_actions is None) == (self.action_dim is None):
            raise ValueError(
                f"num_actions / action_dim: give exactly one (discrete: num_actions, "
                f"continuous: action_dim); got num_actions={self.num_actions}, "
                f"action_dim={self.action_dim}")
        for name in ("num_actions", "action_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name}: must be a positive integer; got {value!r}")
        if any(h < 1 for h in (*self.state_hidden, *self.action_hidden)):
            raise ValueError(f"state_hidden / action_hidden: sizes must be positive; got "
                             f"{self.state_hidden} / {self.action_hidden}")

    @property
    def discrete(self) -> bool:
        return self.num_actions is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Layers


class OneHotLinear(nn.Module):
    """A linear layer on one_hot(index, num_classes), as a row lookup.

    `kernel[index] + bias` equals `one_hot(index) @ kernel + bias`; the bias is
    shared by all classes.
    """

    num_classes: int
    features: int

    @nn.compact
    def __call__(self, index: jax.Array) -> jax.Array:
        init = torch_uniform(self.num_classes)
        kernel = self.param("kernel", init, (self.num_classes, self.features))
        bias = self.param("bias", init, (self.features,))
        return jnp.take(kernel, index, axis=0) + bias


def mlp_layers(tree: Params) -> list:
    """The layers of an `MLP`'s parameters `tree`, input to output: the
    {"kernel", "bias"} dicts of hidden_0, hidden_1, ..., then output (a new
    list)."""
    return networks.layer_list(tree)


class PerSimNet(nn.Module):
    """Standardised (agent, state, action) -> standardised Δ state.

    Call with agent_id (...) int, obs (..., D) standardised, and action (...)
    int (discrete) or (..., A) standardised (continuous); returns (..., D).
    Leading batch dimensions broadcast against each other.
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        self.agent_encoder = OneHotLinear(c.num_agents, c.rank)
        self.state_encoder = MLP(c.state_hidden, c.obs_dim * c.rank)
        if c.discrete:
            self.action_encoder = OneHotLinear(c.num_actions, c.rank)
        else:
            self.action_encoder = MLP(c.action_hidden, c.rank)

    def __call__(self, agent_id: jax.Array, obs: jax.Array, action: jax.Array) -> jax.Array:
        c = self.config
        u = self.agent_encoder(agent_id)                                   # (..., r)
        v = self.state_encoder(obs)                                        # (..., D·r)
        v = v.reshape(*v.shape[:-1], c.obs_dim, c.rank)                    # (..., D, r)
        w = self.action_encoder(action)                                    # (..., r)
        # Δŝ_d = Σ_ℓ u_ℓ(n) v_ℓ(s, d) w_ℓ(a)   (paper, §5)
        return jnp.sum((u * w)[..., None, :] * v, axis=-1)

    def agent_factors(self) -> jax.Array:
        """(N, r) u(n) for every agent: embedding row plus the shared bias."""
        return self.agent_encoder(jnp.arange(self.config.num_agents))

    def factor_features(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        """(..., D, r) x_ℓ(s, a, d) = v_ℓ(s, d) w_ℓ(a): the prediction of an
        agent with factor u is Σ_ℓ x_ℓ u_ℓ (what `newcomers` solves for)."""
        c = self.config
        v = self.state_encoder(obs)
        v = v.reshape(*v.shape[:-1], c.obs_dim, c.rank)                    # (..., D, r)
        return v * self.action_encoder(action)[..., None, :]


@functools.partial(jax.jit, static_argnums=1)
def init_params(key: jax.Array, config: ModelConfig) -> Params:
    """Parameters of one network (no ensemble axis), PyTorch-default uniform.

    Every kernel and bias of a layer with fan-in F is U(±1/√F) (the same
    distribution as the modules' own initialisers). All of them are cut from
    ONE uniform draw: on CPU each separate `jax.random.uniform` adds a
    threefry kernel that costs ~0.2 s to compile.
    """
    agent = jnp.zeros((), jnp.int32)
    obs = jnp.zeros((config.obs_dim,), jnp.float32)
    action = (jnp.zeros((), jnp.int32) if config.discrete
              else jnp.zeros((config.action_dim,), jnp.float32))
    shapes = jax.eval_shape(
        lambda: PerSimNet(config).init(jax.random.PRNGKey(0), agent, obs, action))["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
    draw = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, offset = [], 0
    for (path, leaf), size in zip(leaves, sizes):
        layer = shapes
        for entry in path[:-1]:
            layer = layer[entry.key]
        fan_in = layer["kernel"].shape[0]   # kernels are (fan_in, features)
        bound = 1.0 / np.sqrt(fan_in)
        out.append(draw[offset:offset + size].reshape(leaf.shape) * bound)
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out)


def apply(params: Params, config: ModelConfig, agent_id, obs_z, action_in) -> jax.Array:
    """Standardised Δ prediction of one network; see `PerSimNet`."""
    return PerSimNet(config).apply({"params": params}, agent_id, obs_z, action_in)


def agent_factors(params: Params, config: ModelConfig) -> jax.Array:
    """(N, r) agent factors of one network."""
    return PerSimNet(config).apply({"params": params}, method=PerSimNet.agent_factors)


def factor_features(params: Params, config: ModelConfig, obs_z, action_in) -> jax.Array:
    """(..., D, r) factor features of one network (`PerSimNet.factor_features`)
    for standardised obs (..., D) and action inputs."""
    return PerSimNet(config).apply({"params": params}, obs_z, action_in,
                                   method=PerSimNet.factor_features)


# ---------------------------------------------------------------------------
# Normalisation


@struct.dataclass
class NormStats:
    """Standardisation statistics, computed on the training split.

    Attributes:
      obs_mean, obs_std: (D,) of the input states.
      delta_mean, delta_std: (D,) of the targets next_obs - obs.
      action_mean, action_std: (A,) of continuous actions; (0,) when discrete
        (one-hot actions are not standardised).
    Standard deviations are population (ddof 0) and floored at `STD_EPS`.
    """

    obs_mean: jax.Array
    obs_std: jax.Array
    delta_mean: jax.Array
    delta_std: jax.Array
    action_mean: jax.Array
    action_std: jax.Array

    def normalize_obs(self, obs):
        return (obs - self.obs_mean) / self.obs_std

    def normalize_delta(self, delta):
        return (delta - self.delta_mean) / self.delta_std

    def denormalize_delta(self, delta_z):
        return delta_z * self.delta_std + self.delta_mean

    def action_input(self, action, discrete: bool):
        """What the action encoder takes: the integer action, or the
        standardised continuous action."""
        if discrete:
            return jnp.asarray(action).astype(jnp.int32)
        return (action - self.action_mean) / self.action_std


def compute_stats(obs, action, next_obs, *, discrete: bool) -> NormStats:
    """Statistics of (T, D) obs, (T,) / (T, A) actions and (T, D) next_obs.

    Computed on the host in float64, so that the mean of a constant float32
    column is that constant exactly and the column standardises to exactly 0
    (a float32 mean is off by rounding, which the STD_EPS floor would blow up).
    """
    obs = np.asarray(obs, np.float32).astype(np.float64)
    delta = (np.asarray(next_obs, np.float32) - np.asarray(obs, np.float32)).astype(np.float64)

    def mean_std(x):
        return (jnp.asarray(np.mean(x, axis=0), jnp.float32),
                jnp.asarray(np.maximum(np.std(x, axis=0), STD_EPS), jnp.float32))

    obs_mean, obs_std = mean_std(obs)
    delta_mean, delta_std = mean_std(delta)
    if discrete:
        action_mean = action_std = jnp.zeros((0,), jnp.float32)
    else:
        action_mean, action_std = mean_std(np.asarray(action, np.float32).astype(np.float64))
    return NormStats(obs_mean, obs_std, delta_mean, delta_std, action_mean, action_std)


def identity_stats(obs_dim: int, action_dim: int | None = None) -> NormStats:
    """Statistics that leave inputs and targets unchanged (no standardisation)."""
    a = 0 if action_dim is None else action_dim
    zeros, ones = jnp.zeros((obs_dim,)), jnp.ones((obs_dim,))
    return NormStats(zeros, ones, zeros, ones, jnp.zeros((a,)), jnp.ones((a,)))


def predict_next_obs(params: Params, stats: NormStats, config: ModelConfig,
                     agent_id, obs, action) -> jax.Array:
    """Next state of one network in raw units: obs + Δŝ.

    Args:
      agent_id: (...) int agent ids.
      obs: (..., D) raw states.
      action: (...) int or (..., A) float raw actions.

    Returns:
      (..., D) next states (leading dims broadcast).
    """
    delta_z = apply(params, config, agent_id, stats.normalize_obs(obs),
                    stats.action_input(action, config.discrete))
    return obs + stats.denormalize_delta(delta_z)


# ---------------------------------------------------------------------------
# The forward pass folded for planning


def _fold_input(layer, shift, scale):
    """Folds x_z = (x − shift) / scale into the layer y = x_z W + b."""
    kernel = layer["kernel"] / scale[:, None]
    bias = layer["bias"] - (shift / scale) @ layer["kernel"]
    return {"kernel": kernel, "bias": bias}


def fold_member(params: Params, stats: NormStats, config: ModelConfig, agent_id) -> dict:
    """One network for one agent, rewritten for planning (`folded_next_obs`).

    Everything that does not depend on the state or the candidate is done
    here once: the agent factor u(n); the input standardisation (folded into
    the first layer); the output de-standardisation and u(n) (folded into the
    output layer). For discrete actions the action factor w(a) takes
    num_actions values, so the output layer and the rank contraction become
    one (hidden, num_actions · D) matrix and the prediction a column pick.

    Args:
      params: one network's parameters (no ensemble axis).
      stats: the standardisation statistics.
      config: the network's config.
      agent_id: () int, the agent's index.

    Returns:
      {"state": layers} (discrete) or {"state": layers, "action": layers,
      "delta_mean": (D,)} (continuous), layers as listed by `mlp_layers`.
    """
    rank, dim = config.rank, config.obs_dim
    agent = params["agent_encoder"]
    u = jnp.take(agent["kernel"], agent_id, axis=0) + agent["bias"]            # (r,)
    layers = mlp_layers(params["state_encoder"])
    layers[0] = _fold_input(layers[0], stats.obs_mean, stats.obs_std)
    out_kernel = layers[-1]["kernel"].reshape(-1, dim, rank)                    # (h, D, r)
    out_bias = layers[-1]["bias"].reshape(dim, rank)
    scale = stats.delta_std
    if config.discrete:
        w = params["action_encoder"]["kernel"] + params["action_encoder"]["bias"]  # (nA, r)
        c = u * w
        kernel = jnp.einsum("hdr,ar->had", out_kernel, c) * scale               # (h, nA, D)
        bias = jnp.einsum("dr,ar->ad", out_bias, c) * scale + stats.delta_mean  # (nA, D)
        layers[-1] = {"kernel": kernel.reshape(kernel.shape[0], -1), "bias": bias.reshape(-1)}
        return {"state": layers}
    kernel = out_kernel * (u * scale[:, None])                                  # (h, D, r)
    bias = out_bias * (u * scale[:, None])
    layers[-1] = {"kernel": kernel.reshape(kernel.shape[0], -1), "bias": bias.reshape(-1)}
    action_layers = mlp_layers(params["action_encoder"])
    action_layers[0] = _fold_input(action_layers[0], stats.action_mean, stats.action_std)
    return {"state": layers, "action": action_layers, "delta_mean": stats.delta_mean}


# A first layer with at most this many inputs (e.g. a 2- or 4-dimensional state) is
# computed as a sum of broadcast products, which XLA fuses with the bias and
# ReLU into one loop; as a matmul it would run far below the matmul rate.
SMALL_FAN_IN = 8


def folded_next_obs(folded: dict, config: ModelConfig, obs, action) -> jax.Array:
    """Next states in raw units of one network folded by `fold_member`.

    Equal (to float32 rounding) to `predict_next_obs` for the folded agent.

    Args:
      folded: `fold_member`'s output.
      config: the network's config.
      obs: (B, D) raw states.
      action: (B,) int or (B, A) float raw actions.

    Returns:
      (B, D) next states.
    """
    dim = config.obs_dim
    out = networks.mlp(folded["state"], obs, small_fan_in=SMALL_FAN_IN)
    if config.discrete:
        out = out.reshape(*out.shape[:-1], config.num_actions, dim)
        delta = jnp.take_along_axis(out, action[..., None, None].astype(jnp.int32), axis=-2)
        return obs + delta[..., 0, :]
    v = out.reshape(*out.shape[:-1], dim, config.rank)
    w = networks.mlp(folded["action"], action, small_fan_in=SMALL_FAN_IN)
    return obs + jnp.einsum("...dr,...r->...d", v, w) + folded["delta_mean"]


def count_params(params: Params) -> int:
    """The number of scalars in `params`."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))

