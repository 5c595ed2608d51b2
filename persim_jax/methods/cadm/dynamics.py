"""CaDM at evaluation: a `types.ContextualDynamics` whose context is encoded
from the episode's K latest real transitions. The episode loop pushes each real
transition into the context history (`observe`) and plans on
`dynamics(context)`, whose context stays fixed over the planning horizon."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from persim_jax.methods.cadm.model import (
    CaDMModel,
    encode_actions,
    encode_context,
    flat_history,
    forward_heads,
)


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
