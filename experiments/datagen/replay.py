"""The replay buffer of the DQN and TD3 trainers: a circular buffer of one
agent's transitions, held as arrays in a pytree (so that `vmap` gives every
agent its own), with pure `init`, `add` and `sample`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReplayBuffer:
    """Circular buffer of one agent: leaves (capacity, ...)."""

    obs: jax.Array           # (capacity, D) float32
    action: jax.Array        # (capacity,) int32 or (capacity, A) float32
    reward: jax.Array        # (capacity,) float32
    next_obs: jax.Array      # (capacity, D) float32: the true next observation
    terminal: jax.Array      # (capacity,) float32: 1 where the episode terminated (not truncated)
    position: jax.Array      # () int32: next write index
    size: jax.Array          # () int32: number of filled rows


class Batch(NamedTuple):
    """A minibatch of B transitions: leaves (B, ...) like the buffer's."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    terminal: jax.Array


def init(capacity: int, obs_dim: int, action_shape: tuple[int, ...] = (),
         action_dtype=jnp.int32) -> ReplayBuffer:
    """An empty buffer of `capacity` rows; actions of shape `action_shape`
    ((): discrete indices, (A,): continuous vectors) and dtype `action_dtype`."""
    return ReplayBuffer(
        obs=jnp.zeros((capacity, obs_dim), jnp.float32),
        action=jnp.zeros((capacity, *action_shape), action_dtype),
        reward=jnp.zeros((capacity,), jnp.float32),
        next_obs=jnp.zeros((capacity, obs_dim), jnp.float32),
        terminal=jnp.zeros((capacity,), jnp.float32),
        position=jnp.zeros((), jnp.int32),
        size=jnp.zeros((), jnp.int32))


def add(buffer: ReplayBuffer, obs, action, reward, next_obs, terminal) -> ReplayBuffer:
    """The buffer with B transitions written at its position (overwriting the
    oldest once full): obs, next_obs (B, D), action (B,) or (B, A), reward and
    terminal (B,)."""
    capacity = buffer.obs.shape[0]
    count = obs.shape[0]
    index = (buffer.position + jnp.arange(count)) % capacity
    return buffer.replace(
        obs=buffer.obs.at[index].set(obs), action=buffer.action.at[index].set(action),
        reward=buffer.reward.at[index].set(reward),
        next_obs=buffer.next_obs.at[index].set(next_obs),
        terminal=buffer.terminal.at[index].set(terminal),
        position=(buffer.position + count) % capacity,
        size=jnp.minimum(buffer.size + count, capacity))


def sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Batch:
    """`batch_size` rows drawn uniformly, with replacement, from the filled
    ones (row 0 of an empty buffer)."""
    rows = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.size, 1))
    return jax.tree.map(lambda x: x[rows], Batch(buffer.obs, buffer.action, buffer.reward,
                                                 buffer.next_obs, buffer.terminal))
