"""CartPole (gym's rules): a reward of 1 on every step, the episode over when
the cart leaves ±2.4 or the pole tilts past 12°; two policies to compare.

State: x, x_dot, theta, theta_dot. Actions: 0 push left, 1 push right.
"""

import jax.numpy as jnp

X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * jnp.pi / 360


def reward(obs, action, next_obs):
    """1 per step, the last one included."""
    return jnp.float32(1.0)


def terminated(next_obs):
    """The cart left the track or the pole fell."""
    return (jnp.abs(next_obs[0]) > X_LIMIT) | (jnp.abs(next_obs[2]) > THETA_LIMIT)


def balance(key, obs):
    """Push the cart under the pole: right when the pole leans or falls right."""
    return jnp.int32(obs[2] + 0.5 * obs[3] > 0)


def push_left(key, obs):
    """Always push left (the cart soon leaves the track, or the pole falls)."""
    return jnp.int32(0)
