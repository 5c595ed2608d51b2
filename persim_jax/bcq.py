"""BCQ-P and BCQ-A, the paper's model-free baselines (appendix D.2), in JAX.

Batch-Constrained deep Q-learning (Fujimoto et al. 2019) as the authors'
PyTorch code does it (sfujim/BCQ @4876f7e; shared/reference/baselines.md §2).
Every layer is initialised like torch.nn.Linear, U(±1/√fan_in) for weights and
biases (`persim_jax.model.MLP`); not_done = 1 - `Transitions.done`, 0 only at a
true termination (time-limit ends keep 1).

Discrete (MountainCar, CartPole): Q and an imitation net G, two independent
MLPs (256, 256) on the raw states. An action may be chosen when G(a|s) /
max G(·|s) > threshold (strict; 0.3). Target: a* = the masked argmax of the
ONLINE Q and G at s', y = r + γ · not_done · Q_target(s', a*). Loss: Huber
(δ = 1) + NLL(a | G) + 0.01 · mean(logits²); one Adam (3e-4) for both, batch
64, Polyak 0.005 every step. Acting: the greedy masked argmax (ε = 0).

Continuous (HalfCheetah; box [-max_action, max_action]): a VAE (750, 750;
latent 2·A; log σ clamped to [-4, 15]; decoder max_a · tanh; free samples
z ~ N(0, I) clipped to ±0.5), an actor a' = clip(a + Φ · max_a · tanh(ξ(s,
a)), ±max_a), Φ = 0.05 (400, 300), two critics (400, 300). A step: (1) VAE,
MSE + 0.5 · KL; (2) critics: s' repeated 10×, actions from the online VAE
perturbed by the target actor, q = λ · min(Q1', Q2') + (1 - λ) · max (λ =
0.75), max over the copies, y = r + not_done · γ · q, MSE(Q1, y) + MSE(Q2, y);
(3) actor: maximise mean Q1(s, ξ(s, dec(s))); (4) Polyak on the critics' and
the actor's targets. Three Adams (1e-3), batch 100. Acting: 100 decoded,
perturbed samples, the argmax of Q1.

BCQ-P: one policy on all transitions. BCQ-A: one per evaluated agent, on that
agent's trajectory only. Training is one jitted program per chunk of
iterations: a `lax.scan` over iterations, vmapped over the K policies, each
drawing minibatches uniformly with replacement from its own rows of a padded
(K, T_max, ...) array. Python loops over chunks only (progress, resumable
orbax checkpoints). Iteration i of the policy of agent a uses
fold_in(fold_in(key, a), i): results depend neither on the chunk size nor on
the other agents trained beside it.

    method = bcq.BCQA(bcq.BCQConfig(iterations=550_000))
    trained = method.train(transitions, method.key("train", 0), agent_ids=[0, 1, 2, 3, 4])
    returns = evaluation.run_policy_episodes(
        key, method.policy_for_agent(trained, [0, 1, 2, 3, 4]), env, env.test_agents, 100)

Where we differ from the authors' code, and why:
  * the VAE's μ and log σ heads are one Linear(750, 2 · latent), split: the
    same function and the same initial distribution;
  * the discrete target net holds Q only (the authors' copy of G is never read);
  * threshold < 1: at 1 the strict ">" masks every action and the argmax
    silently returns action 0 (baselines.md §3);
  * continuous actions must lie in the box (the decoder cannot produce others).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, struct
from tqdm.auto import tqdm

from persim_jax import checkpoints, evaluation
from persim_jax._validate import positive_int
from persim_jax.data import Transitions, load_msgpack, save_msgpack, validate_transitions
from persim_jax.methods import Method
from persim_jax.model import MLP, mlp_layers

FILE_FORMAT = "persim-jax-bcq"
CHECKPOINT_FORMAT = 1
# Iterations per jitted call: the granularity of progress and checkpoints.
CHUNK_ITERATIONS = 5_000
# Masked actions' value in the argmax (the authors' -1e8).
MASKED_VALUE = -1e8
# The VAE's log σ clamp and the free-sampling latent clip (authors' code).
LOG_STD_RANGE = (-4.0, 15.0)
LATENT_CLIP = 0.5


# ---------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class BCQConfig:
    """How BCQ trains and acts (validated at construction; hashable).

    Attributes:
      iterations: gradient steps per policy (paper: 5.5e5).
      batch_size: minibatch size; None: 64 (discrete) / 100 (continuous).
      learning_rate: Adam's step size (every optimiser); None: 3e-4
        (discrete) / 1e-3 (continuous).
      discount: γ.
      tau: Polyak rate of the target networks, every step.
      threshold: discrete only; an action passes when G(a|s) / max G(·|s) > it;
        in [0, 1).
      phi: continuous only; the actor perturbs by at most Φ · max_action.
      lam: continuous only; λ of the soft clipped double-Q target.
      max_action: continuous only; the action box is [-max_action, max_action].
      q_hidden: hidden sizes of the discrete Q-net and imitation net G.
      vae_hidden: hidden sizes of the VAE's encoder and decoder.
      actor_hidden: hidden sizes of the perturbation actor ξ.
      critic_hidden: hidden sizes of each of the two critics.
      target_samples: copies of s' (decoded actions) in the critic target.
      acting_samples: decoded actions scored by Q1 when acting.
    """

    iterations: int = 550_000
    batch_size: int | None = None
    learning_rate: float | None = None
    discount: float = 0.99
    tau: float = 0.005
    threshold: float = 0.3
    phi: float = 0.05
    lam: float = 0.75
    max_action: float = 1.0
    q_hidden: tuple[int, ...] = (256, 256)
    vae_hidden: tuple[int, ...] = (750, 750)
    actor_hidden: tuple[int, ...] = (400, 300)
    critic_hidden: tuple[int, ...] = (400, 300)
    target_samples: int = 10
    acting_samples: int = 100

    def __post_init__(self):
        for name in ("iterations", "target_samples", "acting_samples"):
            positive_int(name, getattr(self, name))
        if self.batch_size is not None:
            positive_int("batch_size", self.batch_size)
        if self.learning_rate is not None:
            _check_range("learning_rate", self.learning_rate, 0.0, np.inf, low_open=True)
        _check_range("discount", self.discount, 0.0, 1.0)
        _check_range("tau", self.tau, 0.0, 1.0, low_open=True)
        _check_range("threshold", self.threshold, 0.0, 1.0, high_open=True)
        _check_range("phi", self.phi, 0.0, np.inf)
        _check_range("lam", self.lam, 0.0, 1.0)
        _check_range("max_action", self.max_action, 0.0, np.inf, low_open=True)
        for name in ("q_hidden", "vae_hidden", "actor_hidden", "critic_hidden"):
            sizes = getattr(self, name)
            if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__") or not sizes:
                raise ValueError(f"{name}: a non-empty sequence of layer sizes; got {sizes!r}")
            for size in sizes:
                positive_int(name, size)
            object.__setattr__(self, name, tuple(int(s) for s in sizes))
        for name in ("discount", "tau", "threshold", "phi", "lam", "max_action"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("iterations", "target_samples", "acting_samples"):
            object.__setattr__(self, name, int(getattr(self, name)))

    def resolved(self, discrete: bool) -> "BCQConfig":
        """The config with the variant's default batch size and step size."""
        return dataclasses.replace(
            self,
            batch_size=int(self.batch_size or (64 if discrete else 100)),
            learning_rate=float(self.learning_rate or (3e-4 if discrete else 1e-3)))

    def to_dict(self) -> dict:
        """JSON-able fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def _check_range(name, value, low, high, *, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: must be a number in {bounds}; got {value!r}")


# ---------------------------------------------------------------------------
# Networks (parameters are `persim_jax.model.MLP` trees)


def _init_mlp(key, hidden: tuple[int, ...], in_dim: int, out_dim: int):
    return MLP(hidden, out_dim).init(key, jnp.zeros((1, in_dim), jnp.float32))["params"]


def _mlp(params, x: jax.Array) -> jax.Array:
    """An `MLP` forward pass; the layer sizes are read off `params`."""
    layers = mlp_layers(params)
    hidden = tuple(int(layer["bias"].shape[-1]) for layer in layers[:-1])
    return MLP(hidden, int(layers[-1]["bias"].shape[-1])).apply({"params": params}, x)


def masked_q(params, obs: jax.Array, threshold: float) -> jax.Array:
    """(N, nA) Q-values of obs (N, D), MASKED_VALUE where G(a|s) / max G ≤ threshold."""
    q = _mlp(params["q"], obs)
    probs = jnp.exp(jax.nn.log_softmax(_mlp(params["g"], obs), axis=-1))
    passes = probs / jnp.max(probs, axis=-1, keepdims=True) > threshold
    return jnp.where(passes, q, MASKED_VALUE)


def decode(vae, obs: jax.Array, key: jax.Array | None, max_action: float,
           latent: jax.Array | None = None) -> jax.Array:
    """(N, A) actions decoded from obs (N, D) and `latent`, or, if None, from
    z ~ N(0, I) clipped to ±0.5 (drawn with `key`)."""
    if latent is None:
        size = vae["encoder"]["output"]["bias"].shape[-1] // 2
        latent = jnp.clip(jax.random.normal(key, (obs.shape[0], size)), -LATENT_CLIP, LATENT_CLIP)
    return max_action * jnp.tanh(_mlp(vae["decoder"], jnp.concatenate([obs, latent], -1)))


def perturb(actor, obs: jax.Array, action: jax.Array, phi: float, max_action: float):
    """(N, A) a + Φ · max_a · tanh(ξ(s, a)), clipped to the action box."""
    shift = phi * max_action * jnp.tanh(_mlp(actor, jnp.concatenate([obs, action], -1)))
    return jnp.clip(action + shift, -max_action, max_action)


def critic_values(critic, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Q1, Q2), each (N,), of the two independent critics."""
    x = jnp.concatenate([obs, action], -1)
    return _mlp(critic["q1"], x)[:, 0], _mlp(critic["q2"], x)[:, 0]


# ---------------------------------------------------------------------------
# One gradient step (pure; vmapped over policies, scanned over iterations)


@struct.dataclass
class Batch:
    """A minibatch: obs (B, D), action (B,) int32 or (B, A), next_obs (B, D),
    reward (B,), not_done (B,) float32."""

    obs: jax.Array
    action: jax.Array
    next_obs: jax.Array
    reward: jax.Array
    not_done: jax.Array


@struct.dataclass
class DiscreteState:
    """params {"q", "g"}, the target Q's params, one Adam state for both nets."""

    params: Any
    target_q: Any
    opt_state: Any


@struct.dataclass
class ContinuousState:
    """The VAE, the actor and the two critics (with targets), three Adam states."""

    vae: Any
    actor: Any
    actor_target: Any
    critic: Any
    critic_target: Any
    vae_opt: Any
    actor_opt: Any
    critic_opt: Any


def _polyak(online, target, tau: float):
    return jax.tree.map(lambda p, t: tau * p + (1.0 - tau) * t, online, target)


def _adam_init(params):
    # Adam's state does not depend on its step size: one compiled init serves all.
    return optax.adam(1.0).init(params)


def _adam_step(loss_fn, params, opt_state, learning_rate: float):
    """(params, opt_state, loss) after one Adam step on loss_fn(params)."""
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def init_discrete(key, obs_dim: int, num_actions: int, config: BCQConfig) -> DiscreteState:
    """A fresh discrete BCQ (sizes `config.q_hidden`): independent Q and G, target Q = Q."""
    q_key, g_key = jax.random.split(key)
    params = {"q": _init_mlp(q_key, config.q_hidden, obs_dim, num_actions),
              "g": _init_mlp(g_key, config.q_hidden, obs_dim, num_actions)}
    return DiscreteState(params, params["q"], _adam_init(params))


def discrete_update(state: DiscreteState, batch: Batch, key, config: BCQConfig):
    """One discrete BCQ step (config resolved). Returns (state, {"q_loss", "i_loss"})."""
    del key                                      # deterministic given the batch
    next_action = jnp.argmax(masked_q(state.params, batch.next_obs, config.threshold), -1)
    next_q = jnp.take_along_axis(_mlp(state.target_q, batch.next_obs), next_action[:, None], -1)
    target = batch.reward + batch.not_done * config.discount * next_q[:, 0]
    rows = jnp.arange(batch.action.shape[0])

    def loss_fn(params):
        q = _mlp(params["q"], batch.obs)[rows, batch.action]
        logits = _mlp(params["g"], batch.obs)
        q_loss = jnp.mean(optax.huber_loss(q, target, delta=1.0))
        i_loss = -jnp.mean(jax.nn.log_softmax(logits, -1)[rows, batch.action])
        return q_loss + i_loss + 1e-2 * jnp.mean(logits ** 2), (q_loss, i_loss)

    (_, (q_loss, i_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optax.adam(config.learning_rate).update(grads, state.opt_state,
                                                                  state.params)
    params = optax.apply_updates(state.params, updates)
    state = DiscreteState(params, _polyak(params["q"], state.target_q, config.tau), opt_state)
    return state, {"q_loss": q_loss, "i_loss": i_loss}


def init_continuous(key, obs_dim: int, action_dim: int, config: BCQConfig) -> ContinuousState:
    """A fresh continuous BCQ (config's layer sizes); the targets start as copies."""
    keys = jax.random.split(key, 5)
    latent = 2 * action_dim
    vae = {"encoder": _init_mlp(keys[0], config.vae_hidden, obs_dim + action_dim, 2 * latent),
           "decoder": _init_mlp(keys[1], config.vae_hidden, obs_dim + latent, action_dim)}
    actor = _init_mlp(keys[2], config.actor_hidden, obs_dim + action_dim, action_dim)
    critic = {"q1": _init_mlp(keys[3], config.critic_hidden, obs_dim + action_dim, 1),
              "q2": _init_mlp(keys[4], config.critic_hidden, obs_dim + action_dim, 1)}
    return ContinuousState(vae, actor, actor, critic, critic, _adam_init(vae), _adam_init(actor),
                           _adam_init(critic))


def _vae_loss(vae, batch: Batch, key, max_action: float):
    """MSE of the reconstruction + 0.5 · KL; the encoder's log σ clamped."""
    encoded = _mlp(vae["encoder"], jnp.concatenate([batch.obs, batch.action], -1))
    mean, log_std = jnp.split(encoded, 2, -1)
    log_std = jnp.clip(log_std, *LOG_STD_RANGE)
    std = jnp.exp(log_std)
    recon = decode(vae, batch.obs, None, max_action,
                   latent=mean + std * jax.random.normal(key, std.shape))
    kl = -0.5 * jnp.mean(1.0 + 2.0 * log_std - mean ** 2 - std ** 2)
    return jnp.mean((recon - batch.action) ** 2) + 0.5 * kl


def critic_target(state: ContinuousState, batch: Batch, key, config: BCQConfig) -> jax.Array:
    """(B,) y = r + not_done · γ · max over `target_samples` decoded actions of
    λ · min(Q1', Q2') + (1 - λ) · max(Q1', Q2') (target critics and actor,
    online VAE)."""
    copies = config.target_samples
    next_obs = jnp.repeat(batch.next_obs, copies, axis=0)        # torch.repeat_interleave
    sampled = decode(state.vae, next_obs, key, config.max_action)
    action = perturb(state.actor_target, next_obs, sampled, config.phi, config.max_action)
    q1, q2 = critic_values(state.critic_target, next_obs, action)
    q = config.lam * jnp.minimum(q1, q2) + (1.0 - config.lam) * jnp.maximum(q1, q2)
    q = jnp.max(q.reshape(-1, copies), axis=1)
    return batch.reward + batch.not_done * config.discount * q


def continuous_update(state: ContinuousState, batch: Batch, key, config: BCQConfig):
    """One continuous BCQ step: VAE, critics, actor, Polyak (config resolved).
    Returns (state, {"vae_loss", "critic_loss", "actor_loss"})."""
    vae_key, target_key, actor_key = jax.random.split(key, 3)
    lr, max_action = config.learning_rate, config.max_action
    vae, vae_opt, vae_loss = _adam_step(
        lambda p: _vae_loss(p, batch, vae_key, max_action), state.vae, state.vae_opt, lr)
    state = state.replace(vae=vae, vae_opt=vae_opt)
    target = critic_target(state, batch, target_key, config)

    def critic_loss(critic):
        q1, q2 = critic_values(critic, batch.obs, batch.action)
        return jnp.mean((q1 - target) ** 2) + jnp.mean((q2 - target) ** 2)

    critic, critic_opt, c_loss = _adam_step(critic_loss, state.critic, state.critic_opt, lr)
    sampled = decode(vae, batch.obs, actor_key, max_action)

    def actor_loss(actor):
        action = perturb(actor, batch.obs, sampled, config.phi, max_action)
        return -jnp.mean(critic_values(critic, batch.obs, action)[0])

    actor, actor_opt, a_loss = _adam_step(actor_loss, state.actor, state.actor_opt, lr)
    state = state.replace(
        actor=actor, actor_opt=actor_opt, critic=critic, critic_opt=critic_opt,
        critic_target=_polyak(critic, state.critic_target, config.tau),
        actor_target=_polyak(actor, state.actor_target, config.tau))
    return state, {"vae_loss": vae_loss, "critic_loss": c_loss, "actor_loss": a_loss}


# ---------------------------------------------------------------------------
# Policies


@struct.dataclass
class DiscretePolicy:
    """policy(key, obs (D,)) -> () int32: the greedy masked argmax of Q."""

    params: Any
    threshold: float = struct.field(pytree_node=False)

    def __call__(self, key, obs):
        del key
        return jnp.argmax(masked_q(self.params, obs[None], self.threshold)[0]).astype(jnp.int32)


@struct.dataclass
class ContinuousPolicy:
    """policy(key, obs (D,)) -> (A,) float32: of `samples` decoded and
    perturbed actions, the one with the highest Q1."""

    params: Any
    phi: float = struct.field(pytree_node=False)
    max_action: float = struct.field(pytree_node=False)
    samples: int = struct.field(pytree_node=False)

    def __call__(self, key, obs):
        obs = jnp.broadcast_to(obs, (self.samples, obs.shape[-1]))
        sampled = decode(self.params["vae"], obs, key, self.max_action)
        action = perturb(self.params["actor"], obs, sampled, self.phi, self.max_action)
        q1, _ = critic_values(self.params["critic"], obs, action)
        return action[jnp.argmax(q1)]


@struct.dataclass
class BCQPolicyForAgent:
    """(row, covariates) -> the policy of row `row`: stacked policy `index[row]`."""

    policies: Any       # a DiscretePolicy / ContinuousPolicy, params with a leading K axis
    index: jax.Array    # (A,) int32

    def __call__(self, row, covariates):
        del covariates
        return jax.tree.map(lambda leaf: leaf[self.index[row]], self.policies)


@struct.dataclass
class BCQPolicies:
    """What BCQ trained: K policies' acting parameters, stacked.

    Attributes:
      params: every leaf with a leading K axis; discrete {"q", "g"},
        continuous {"vae", "actor", "critic"}.
      config: the resolved `BCQConfig` it was trained with.
      agent_ids: BCQ-A: the agent of each of the K policies; BCQ-P: None
        (one policy, K = 1, for every agent).
    """

    params: Any
    config: BCQConfig = struct.field(pytree_node=False)
    agent_ids: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def discrete(self) -> bool:
        return "q" in self.params

    def stacked_policy(self):
        """The K policies as one policy pytree whose params keep the K axis."""
        if self.discrete:
            return DiscretePolicy(self.params, self.config.threshold)
        return ContinuousPolicy(self.params, self.config.phi, self.config.max_action,
                                self.config.acting_samples)

    def policy(self, index: int):
        """The policy of stacked row `index`: `policy(key, obs) -> action`."""
        return jax.tree.map(lambda leaf: leaf[index], self.stacked_policy())

    def policy_for_agent(self, agent_ids: Sequence[int]) -> BCQPolicyForAgent:
        """Row i -> agent `agent_ids[i]`'s policy (BCQ-P: the one policy)."""
        ids = [int(a) for a in agent_ids]
        if self.agent_ids is None:
            index = [0] * len(ids)
        else:
            missing = sorted(set(ids) - set(self.agent_ids))
            if missing:
                raise ValueError(f"agent_ids: no policy was trained for agents {missing}; "
                                 f"trained: {list(self.agent_ids)}")
            index = [self.agent_ids.index(a) for a in ids]
        return BCQPolicyForAgent(self.stacked_policy(), jnp.asarray(index, jnp.int32))

    def save(self, path: str | os.PathLike) -> None:
        """Writes one msgpack file atomically."""
        payload = {"format": FILE_FORMAT, "config": self.config.to_dict(),
                   "agent_ids": None if self.agent_ids is None else list(self.agent_ids),
                   "params": jax.tree.map(np.asarray, serialization.to_state_dict(self.params))}
        save_msgpack(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BCQPolicies":
        payload = load_msgpack(path, FILE_FORMAT, "a file of BCQ policies")
        ids = payload["agent_ids"]
        return cls(params=jax.tree.map(jnp.asarray, payload["params"]),
                   config=BCQConfig(**payload["config"]),
                   agent_ids=None if ids is None else tuple(int(a) for a in ids))


# ---------------------------------------------------------------------------
# Training


@struct.dataclass
class PolicyData:
    """Each policy's transitions: `rows`, a Batch of (K, T, ...) arrays padded
    to the longest, and count (K,) int32 real rows (rows ≥ count are padding)."""

    rows: Batch
    count: jax.Array


def policy_data(transitions: Transitions, agent_ids: Sequence[int] | None = None) -> PolicyData:
    """BCQ-P (agent_ids None): all transitions as one policy's; BCQ-A: one
    policy per id, holding that agent's transitions only."""
    agent_of = np.asarray(transitions.agent_id)
    if agent_ids is None:
        groups = [np.arange(agent_of.shape[0])]
    else:
        groups = [np.flatnonzero(agent_of == a) for a in agent_ids]
    length = max(len(g) for g in groups)
    action_dtype = np.int32 if transitions.discrete else np.float32
    not_done = 1.0 - np.asarray(transitions.done, np.float32)

    def stack(values, dtype):
        values = np.asarray(values, dtype)
        out = np.zeros((len(groups), length, *values.shape[1:]), dtype)
        for k, rows in enumerate(groups):
            out[k, :len(rows)] = values[rows]
        return jnp.asarray(out)

    rows = Batch(stack(transitions.obs, np.float32), stack(transitions.action, action_dtype),
                 stack(transitions.next_obs, np.float32), stack(transitions.reward, np.float32),
                 stack(not_done, np.float32))
    return PolicyData(rows, jnp.asarray([len(g) for g in groups], jnp.int32))


def _sample(data: PolicyData, key, batch_size: int) -> Batch:
    """A minibatch drawn uniformly with replacement from one policy's rows."""
    index = jax.random.randint(key, (batch_size,), 0, data.count)
    return jax.tree.map(lambda rows: rows[index], data.rows)


@functools.lru_cache(maxsize=32)
def make_chunk_fn(config: BCQConfig, discrete: bool, length: int):
    """The jitted chunk: (states, data: PolicyData, keys (K, 2), start) ->
    (states, mean metrics (K,)); `length` iterations start..start+length-1 of
    every policy, vmapped over the K policies (config resolved)."""
    update = discrete_update if discrete else continuous_update

    def one_policy(state, data, key, start):
        def step(state, iteration):
            batch_key, update_key = jax.random.split(jax.random.fold_in(key, iteration))
            return update(state, _sample(data, batch_key, config.batch_size), update_key, config)

        state, metrics = jax.lax.scan(step, state, start + jnp.arange(length))
        return state, jax.tree.map(jnp.mean, metrics)

    return jax.jit(jax.vmap(one_policy, in_axes=(0, 0, 0, None)))


def _program_config(config: BCQConfig) -> BCQConfig:
    """What the compiled programs depend on: all but the number of iterations
    (one program serves runs of any length, and a resumed run)."""
    return dataclasses.replace(config, iterations=1)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_states(keys, config: BCQConfig, discrete: bool, obs_dim: int, action_size: int):
    """K fresh training states, one per key (K, 2); action_size: the number
    of discrete actions or the continuous action dimension."""
    init = init_discrete if discrete else init_continuous
    return jax.vmap(lambda key: init(key, obs_dim, action_size, config))(keys)


def _check_inputs(transitions: Transitions, config: BCQConfig, agent_ids) -> None:
    validate_transitions(transitions)
    if not transitions.discrete:
        largest = float(np.max(np.abs(np.asarray(transitions.action))))
        if largest > config.max_action * (1 + 1e-6):
            raise ValueError(f"action: continuous actions must lie in [-{config.max_action}, "
                             f"{config.max_action}] (max_action); found |a| = {largest:.4g}")
    if agent_ids is None:
        return
    ids = [int(a) for a in agent_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"agent_ids: a non-empty list of distinct agent ids; got {ids}")
    counts = transitions.transitions_per_agent()
    bad = [a for a in ids if not 0 <= a < transitions.num_agents or counts[a] == 0]
    if bad:
        raise ValueError(f"agent_ids: agents {bad} have no transitions (ids 0.."
                         f"{transitions.num_agents - 1})")


def fit(transitions: Transitions, config: BCQConfig | None = None, *, key: jax.Array,
        agent_ids: Sequence[int] | None = None, checkpoint_dir: str | os.PathLike | None = None,
        chunk_iterations: int = CHUNK_ITERATIONS, progress: bool = True) -> BCQPolicies:
    """Trains BCQ-P (agent_ids None: one policy on every transition) or BCQ-A
    (one policy per id of `agent_ids`, each on its agent's transitions only).

    Discrete or continuous follows `transitions.discrete`. Policy k's
    randomness is fold_in(key, agent) (BCQ-P: agent 0): its init key and the
    key of each iteration.

    Args:
      transitions: the logged data (`done` = true terminations).
      config: `BCQConfig` (default: the paper's).
      key: PRNG key.
      agent_ids: BCQ-A's agents (dataset ids 0..N-1).
      checkpoint_dir: resumable orbax checkpoints after every chunk; a
        directory holding a different run is refused.
      chunk_iterations: iterations per jitted call (progress, checkpoints).
      progress: show a tqdm bar.

    Returns:
      `BCQPolicies`, params stacked over K = len(agent_ids) (BCQ-P: 1).
    """
    config = (config or BCQConfig()).resolved(transitions.discrete)
    _check_inputs(transitions, config, agent_ids)
    positive_int("chunk_iterations", chunk_iterations)
    data = policy_data(transitions, agent_ids)
    agents = jnp.asarray([0] if agent_ids is None else [int(a) for a in agent_ids])
    keys = jax.vmap(lambda a: jax.random.split(jax.random.fold_in(key, a)))(agents)
    # The initial states depend on the layer sizes only.
    sizes = BCQConfig(q_hidden=config.q_hidden, vae_hidden=config.vae_hidden,
                      actor_hidden=config.actor_hidden, critic_hidden=config.critic_hidden)
    state = _init_states(keys[:, 0], sizes, transitions.discrete, transitions.obs_dim,
                         transitions.num_actions or transitions.action_dim)
    manager = run = None
    if checkpoint_dir is not None:
        run = _run_description(data, config, key, transitions.discrete, agent_ids)
        manager = checkpoints.manager(checkpoint_dir)
    state = _train_chunks(state, data, keys[:, 1], config, transitions.discrete,
                          int(chunk_iterations), manager, run, progress)
    if transitions.discrete:
        params = state.params
    else:
        params = {"vae": state.vae, "actor": state.actor, "critic": state.critic}
    return BCQPolicies(params, config,
                       None if agent_ids is None else tuple(int(a) for a in agent_ids))


def _train_chunks(state, data: PolicyData, keys, config: BCQConfig, discrete: bool,
                  chunk: int, manager, run: dict | None, progress: bool):
    """The chunk loop: resumes from the latest checkpoint, saves after every
    chunk, shows progress."""
    start, bar = 0, None
    try:
        if manager is not None:
            state, start = checkpoints.restore_latest(manager, state, run,
                                                      total=config.iterations, unit="iteration")
        bar = tqdm(total=config.iterations, initial=start, disable=not progress,
                   desc=f"bcq ({data.count.shape[0]} policies)", unit="it", leave=False)
        while start < config.iterations:
            length = min(chunk, config.iterations - start)
            program = make_chunk_fn(_program_config(config), discrete, length)
            state, metrics = program(state, data, keys, start)
            start += length
            if manager is not None:
                checkpoints.save(manager, start, state, run, force=True)
            bar.update(length)
            bar.set_postfix({name: f"{float(np.mean(value)):.4g}"
                             for name, value in metrics.items()})
    finally:
        if bar is not None:
            bar.close()
        checkpoints.close(manager)
    return state


# ---------------------------------------------------------------------------
# Checkpoints


def _run_description(data: PolicyData, config: BCQConfig, key, discrete: bool,
                     agent_ids) -> dict:
    """What must match for a checkpoint to be resumed (JSON-able): the data's
    digest, the config (`iterations` aside: a run may be extended), the key."""
    description = {"format": CHECKPOINT_FORMAT, "discrete": bool(discrete),
                   **{k: v for k, v in config.to_dict().items() if k != "iterations"},
                   "agent_ids": None if agent_ids is None else [int(a) for a in agent_ids],
                   "key": checkpoints.key_list(key),
                   "data_sha256": checkpoints.data_digest(jax.tree.leaves(data))}
    return json.loads(json.dumps(description))


# ---------------------------------------------------------------------------
# Methods of the harness


@dataclasses.dataclass(frozen=True)
class BCQP(Method):
    """BCQ-P: one BCQ policy trained on every agent's transitions."""

    config: BCQConfig = BCQConfig()
    name: ClassVar[str] = "bcq_p"
    kind: ClassVar[str] = "policy"
    trains: ClassVar[bool] = True
    predicts: ClassVar[bool] = False

    def description(self) -> dict:
        return self.config.to_dict()

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> BCQPolicies:
        del agent_ids                       # one policy for everyone
        return fit(transitions, self.config, key=key, checkpoint_dir=workdir)

    def save(self, trained: BCQPolicies, path) -> None:
        trained.save(path)

    def load(self, path) -> BCQPolicies:
        return BCQPolicies.load(path)

    def policy_for_agent(self, trained: BCQPolicies, agent_ids) -> evaluation.PolicyForAgent:
        return trained.policy_for_agent(agent_ids)


@dataclasses.dataclass(frozen=True)
class BCQA(BCQP):
    """BCQ-A: one BCQ policy per evaluated agent, on its own trajectory."""

    name: ClassVar[str] = "bcq_a"

    def train(self, transitions, key, *, workdir=None, agent_ids=None) -> BCQPolicies:
        if agent_ids is None or not len(agent_ids):
            raise ValueError("agent_ids: bcq_a trains one policy per evaluated agent; "
                             "give their ids")
        return fit(transitions, self.config, key=key, agent_ids=agent_ids,
                   checkpoint_dir=workdir)
