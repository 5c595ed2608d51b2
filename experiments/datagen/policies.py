"""Logging and test policies: networks, action selection, evaluation, checkpoints.

The paper's offline data are logged by "pure" policies, one trained online on
each policy-training agent of Table 1, and its prediction-error protocol
rolls out one "test" policy trained on the default agent. The networks are
those of the authors' test policies (docs/authors-code.md 5.1):

  * discrete envs (DQN): `QNetwork`, obs -> 256 -> ReLU -> 256 -> ReLU -> nA;
  * HalfCheetah (TD3): `Actor`, obs -> 256 -> ReLU -> 256 -> ReLU -> A -> tanh.

A policy is a pytree of flax params; several policies of one env stack on a
leading axis (K, ...), so that one `vmap` evaluates all of them. Trainers live
in `experiments.datagen.dqn` and `experiments.datagen.td3`. The prediction
protocol's acting policy is `test_policy(env)`, an `EpsilonGreedyPolicy`.

Checkpoints are small msgpack files (`flax.serialization`), one per policy:
`<dir>/<env>_pure_<k>.msgpack` (k indexes `env.policy_training_agents`) and
`<dir>/<env>_test.msgpack`, plus `<dir>/<env>.json` describing them (agents,
returns reached, training budget). The shipped ones are in
`experiments/policies/`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, struct

from persim_jax import networks
from persim_jax.data import atomic_write

Params = Any

# experiments/policies/, beside this package.
DEFAULT_POLICY_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "policies")

POLICY_KINDS = ("pure", "test")


# ---------------------------------------------------------------------------
# Networks


class MLP(networks.MLP):
    """ReLU MLP with a linear output layer: `persim_jax.networks.MLP` with flax
    `nn.Dense`'s initialisation and layer names (Dense_0, Dense_1, ...), so
    that the shipped policy files load and act as before."""

    init_scheme: str = "lecun"
    layer_names: str = "dense"


class QNetwork(nn.Module):
    """(..., D) observations -> (..., num_actions) action values."""

    num_actions: int
    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, obs):
        return MLP(tuple(self.hidden), self.num_actions)(obs)


class Actor(nn.Module):
    """(..., D) observations -> (..., A) deterministic actions in [-1, 1]."""

    action_dim: int
    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, obs):
        return jnp.tanh(MLP(tuple(self.hidden), self.action_dim)(obs))


class Critic(nn.Module):
    """TD3's twin critic: (..., D), (..., A) -> two (...) action values."""

    hidden: Sequence[int] = (256, 256)

    @nn.compact
    def __call__(self, obs, action):
        x = jnp.concatenate([obs, action], axis=-1)
        q1 = MLP(tuple(self.hidden), 1, name="q1")(x)[..., 0]
        q2 = MLP(tuple(self.hidden), 1, name="q2")(x)[..., 0]
        return q1, q2


def policy_network(env, hidden: Sequence[int] = (256, 256)) -> nn.Module:
    """The policy network of `env`: a `QNetwork` for discrete actions, an
    `Actor` for continuous ones."""
    if env.discrete_actions:
        return QNetwork(num_actions=env.num_actions, hidden=tuple(hidden))
    return Actor(action_dim=env.action_dim, hidden=tuple(hidden))


def init_policy(env, key: jax.Array, hidden: Sequence[int] = (256, 256)) -> Params:
    """Freshly initialised params of `policy_network(env)`."""
    return policy_network(env, hidden).init(key, jnp.zeros((env.obs_dim,), jnp.float32))


# ---------------------------------------------------------------------------
# Action selection


def greedy_action(env, params: Params, obs: jax.Array) -> jax.Array:
    """The policy's action for obs (..., D): (...) int32 argmax of the Q-values
    (discrete) or (..., A) float32 actor output (continuous)."""
    out = policy_network(env, hidden_sizes(params)).apply(params, obs)
    if env.discrete_actions:
        return jnp.argmax(out, axis=-1).astype(jnp.int32)
    return out


def random_action(env, key: jax.Array, batch_shape: tuple[int, ...] = ()) -> jax.Array:
    """Uniformly random actions of shape batch_shape (discrete) or
    batch_shape + (A,) (continuous, uniform in [-1, 1]^A)."""
    if env.discrete_actions:
        return jax.random.randint(key, batch_shape, 0, env.num_actions, jnp.int32)
    return jax.random.uniform(key, batch_shape + (env.action_dim,), jnp.float32, -1.0, 1.0)


def epsilon_mix(env, key: jax.Array, action: jax.Array, epsilon) -> tuple[jax.Array, jax.Array]:
    """Replaces each action of a batch (B,) or (B, A) by a uniformly random one
    with probability `epsilon`.

    Returns:
      (actions like `action`, (B,) bool: True where the random action was
      taken).
    """
    coin_key, action_key = jax.random.split(key)
    batch_shape = action.shape[:1]
    explore = jax.random.uniform(coin_key, batch_shape) < epsilon
    random = random_action(env, action_key, batch_shape)
    mask = explore if env.discrete_actions else explore[:, None]
    return jnp.where(mask, random, action), explore


@struct.dataclass
class EpsilonGreedyPolicy:
    """policy(key, obs (D,)) -> action (() int32 or (A,) float32): the greedy action of `params`,
    replaced by a uniformly random one with probability epsilon. A pytree: params are traced
    arguments of a compiled program, env is static."""

    params: Any
    epsilon: jax.Array           # () float32
    env: Any = struct.field(pytree_node=False)

    def __call__(self, key: jax.Array, obs: jax.Array) -> jax.Array:
        action = greedy_action(self.env, self.params, obs)
        action, _ = epsilon_mix(self.env, key, action[None], self.epsilon)
        return action[0]


def hidden_sizes(params: Params) -> tuple[int, ...]:
    """Hidden widths of an `MLP`-based policy, read from its params (so that a
    checkpoint needs no separate architecture record)."""
    mlp = params["params"]["MLP_0"]
    names = sorted((k for k in mlp if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    return tuple(int(mlp[k]["bias"].shape[-1]) for k in names[:-1])


# ---------------------------------------------------------------------------
# Evaluation


def evaluate(env, params: Params, covariates, key: jax.Array, *, num_episodes: int = 5,
             epsilon: float = 0.0, num_steps: int | None = None) -> np.ndarray:
    """Returns of K policies, each on its own agent.

    Args:
      env: the environment.
      params: K stacked policies (leading axis K on every leaf).
      covariates: (K, P) agent k is played by policy k.
      key: PRNG key (resets and ε-exploration).
      num_episodes: episodes per policy.
      epsilon: probability of a uniformly random action at each step (the
        authors' test DQNs select with ε = 0.01).
      num_steps: episode cap; default `env.max_episode_steps`.

    Returns:
      (K, num_episodes) float64 undiscounted returns under the true reward.
    """
    covariates = np.asarray(covariates, np.float64)
    k = covariates.shape[0]
    env.agents.validate(covariates)
    steps = int(num_steps or env.max_episode_steps)
    returns = _evaluate_jit(env, steps, num_episodes, params, jnp.asarray(covariates, jnp.float32),
                            key, jnp.float32(epsilon))
    return np.asarray(returns, np.float64).reshape(k, num_episodes)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _evaluate_jit(env, num_steps, num_episodes, params, covariates, key, epsilon):
    k = covariates.shape[0]
    n = k * num_episodes
    env_params = env.covariates_to_params(jnp.repeat(covariates, num_episodes, axis=0))
    reset_key, run_key = jax.random.split(key)
    obs, state = jax.vmap(env.reset)(jax.random.split(reset_key, n), env_params)

    def step(carry, step_key):
        obs, state, alive, total = carry
        mix_key, env_key = jax.random.split(step_key)
        grouped = obs.reshape(k, num_episodes, -1)
        action = jax.vmap(lambda p, o: greedy_action(env, p, o))(params, grouped)
        action = action.reshape((n,) + action.shape[2:])
        action, _ = epsilon_mix(env, mix_key, action, epsilon)
        obs, state, reward, done, _ = jax.vmap(env.step)(
            jax.random.split(env_key, n), state, action, env_params)
        total = total + jnp.where(alive, reward, 0.0)
        return (obs, state, alive & ~done, total), None

    init = (obs, state, jnp.ones(n, bool), jnp.zeros(n, jnp.float32))
    (_, _, _, total), _ = jax.lax.scan(step, init, jax.random.split(run_key, num_steps))
    return total


# ---------------------------------------------------------------------------
# Checkpoints


def policy_path(env_name: str, kind: str, index: int | None = None,
                directory: str | os.PathLike | None = None) -> str:
    """`<dir>/<env>_pure_<index>.msgpack` or `<dir>/<env>_test.msgpack`."""
    if kind not in POLICY_KINDS:
        raise ValueError(f"policy kind must be one of {POLICY_KINDS}; got {kind!r}")
    directory = os.fspath(directory or DEFAULT_POLICY_DIR)
    if kind == "pure":
        if index is None:
            raise ValueError("a pure policy needs its index (0..K-1 over env.policy_training_agents)")
        return os.path.join(directory, f"{env_name}_pure_{int(index)}.msgpack")
    return os.path.join(directory, f"{env_name}_test.msgpack")


def save_params(path: str | os.PathLike, params: Params) -> None:
    """Writes one policy's params as float32 msgpack, atomically."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    with atomic_write(path) as handle:
        handle.write(serialization.msgpack_serialize(serialization.to_state_dict(params)))


def load_params(path: str | os.PathLike) -> Params:
    """Reads params written by `save_params` (a nested dict of float32 arrays)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no policy checkpoint at {path}; train one with "
            f"`python -m experiments.train_policies --env=...`")
    with open(path, "rb") as handle:
        state = serialization.msgpack_restore(handle.read())
    return jax.tree.map(jnp.asarray, state)


def save_policies(env, kind: str, params: Params, *, directory=None) -> list[str]:
    """Writes K stacked pure policies (kind "pure") or one test policy
    (kind "test"). Returns the paths written."""
    if kind == "test":
        path = policy_path(env.name, "test", directory=directory)
        save_params(path, params)
        return [path]
    k = len(env.policy_training_agents)
    leading = {int(np.shape(x)[0]) for x in jax.tree.leaves(params)}
    if leading != {k}:
        raise ValueError(f"pure policies of {env.name}: expected {k} stacked policies (one per "
                         f"policy-training agent); got leading axes {sorted(leading)}")
    paths = []
    for i in range(k):
        path = policy_path(env.name, "pure", i, directory)
        save_params(path, jax.tree.map(lambda x: x[i], params))
        paths.append(path)
    return paths


def load_pure_policies(env, directory=None) -> Params:
    """The K pure policies of `env`, stacked on a leading axis; policy k was
    trained on `env.policy_training_agents[k]`."""
    k = len(env.policy_training_agents)
    policies = [load_params(policy_path(env.name, "pure", i, directory)) for i in range(k)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *policies)


def load_test_policy(env, directory=None) -> Params:
    """The test policy of `env` (trained on `env.default_agent`)."""
    return load_params(policy_path(env.name, "test", directory=directory))


def test_policy(env, directory=None, epsilon=None) -> EpsilonGreedyPolicy:
    """The paper's test policy of `env` (the prediction protocol's acting policy): epsilon default
    0.01 for discrete actions (the authors' test DQNs), 0 for continuous; ValueError outside [0, 1]."""
    if epsilon is None:
        epsilon = 0.01 if env.discrete_actions else 0.0
    if not 0.0 <= float(epsilon) <= 1.0:
        raise ValueError(f"epsilon: must be in [0, 1]; got {epsilon!r}")
    return EpsilonGreedyPolicy(params=load_test_policy(env, directory),
                               epsilon=jnp.float32(epsilon), env=env)


def save_policy_info(env_name: str, info: dict, directory=None) -> str:
    """Writes `<dir>/<env>.json` (agents, returns reached, budget) atomically,
    merging into an existing file's top-level keys."""
    path = os.path.join(os.fspath(directory or DEFAULT_POLICY_DIR), f"{env_name}.json")
    merged = load_policy_info(env_name, directory) if os.path.exists(path) else {}
    merged.update(info)
    with atomic_write(path, "w") as handle:
        json.dump(merged, handle, indent=1, sort_keys=True)
        handle.write("\n")
    return path


def load_policy_info(env_name: str, directory=None) -> dict:
    """Reads `<dir>/<env>.json`; {} when absent."""
    path = os.path.join(os.fspath(directory or DEFAULT_POLICY_DIR), f"{env_name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def stack(trees: Sequence[Params]) -> Params:
    """Stacks policies on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Params, index: int) -> Params:
    """Policy `index` of a stack."""
    return jax.tree.map(lambda x: x[index], tree)


def select(mask, new: Params, old: Params) -> Params:
    """Two stacks of K policies merged: policy k of `new` where mask[k] (K,)
    bool, else policy k of `old`."""
    mask = jnp.asarray(mask)
    return jax.tree.map(
        lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)
