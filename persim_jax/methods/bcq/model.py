"""BCQ's config, networks and gradient steps (`persim_jax.methods.bcq`).

The pure learning rules of the BCQ baselines: `BCQConfig`, the networks on
`persim_jax.networks.MLP` (PyTorch-style init), and one gradient step of the
discrete (`discrete_update`) and continuous (`continuous_update`) variants,
pure functions that `persim_jax.methods.bcq` vmaps over policies and scans over
iterations. Policies, training and the harness's methods are in
`persim_jax.methods.bcq`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from persim_jax import networks
from persim_jax.data import jsonable
from persim_jax.validation import positive_int
from persim_jax.networks import apply_mlp

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
        return jsonable(dataclasses.asdict(self))


def _check_range(name, value, low, high, *, low_open=False, high_open=False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: must be a number in {bounds}; got {value!r}")


# ---------------------------------------------------------------------------
# Networks (parameters are `persim_jax.networks.MLP` trees: torch-style init,
# layers hidden_0, ..., output)


def _init_mlp(key, hidden: tuple[int, ...], in_dim: int, out_dim: int):
    return networks.MLP(hidden, out_dim).init(key, jnp.zeros((1, in_dim), jnp.float32))["params"]


def masked_q(params, obs: jax.Array, threshold: float) -> jax.Array:
    """(N, nA) Q-values of obs (N, D), MASKED_VALUE where G(a|s) / max G ≤ threshold."""
    q = apply_mlp(params["q"], obs)
    probs = jnp.exp(jax.nn.log_softmax(apply_mlp(params["g"], obs), axis=-1))
    passes = probs / jnp.max(probs, axis=-1, keepdims=True) > threshold
    return jnp.where(passes, q, MASKED_VALUE)


def decode(vae, obs: jax.Array, key: jax.Array | None, max_action: float,
           latent: jax.Array | None = None) -> jax.Array:
    """(N, A) actions decoded from obs (N, D) and `latent`, or, if None, from
    z ~ N(0, I) clipped to ±0.5 (drawn with `key`)."""
    if latent is None:
        size = vae["encoder"]["output"]["bias"].shape[-1] // 2
        latent = jnp.clip(jax.random.normal(key, (obs.shape[0], size)), -LATENT_CLIP, LATENT_CLIP)
    return max_action * jnp.tanh(apply_mlp(vae["decoder"], jnp.concatenate([obs, latent], -1)))


def perturb(actor, obs: jax.Array, action: jax.Array, phi: float, max_action: float):
    """(N, A) a + Φ · max_a · tanh(ξ(s, a)), clipped to the action box."""
    shift = phi * max_action * jnp.tanh(apply_mlp(actor, jnp.concatenate([obs, action], -1)))
    return jnp.clip(action + shift, -max_action, max_action)


def critic_values(critic, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Q1, Q2), each (N,), of the two independent critics."""
    x = jnp.concatenate([obs, action], -1)
    return apply_mlp(critic["q1"], x)[:, 0], apply_mlp(critic["q2"], x)[:, 0]


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
    next_q = jnp.take_along_axis(apply_mlp(state.target_q, batch.next_obs), next_action[:, None],
                                 -1)
    target = batch.reward + batch.not_done * config.discount * next_q[:, 0]
    rows = jnp.arange(batch.action.shape[0])

    def loss_fn(params):
        q = apply_mlp(params["q"], batch.obs)[rows, batch.action]
        logits = apply_mlp(params["g"], batch.obs)
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
    encoded = apply_mlp(vae["encoder"], jnp.concatenate([batch.obs, batch.action], -1))
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
