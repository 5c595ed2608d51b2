"""MountainCar (gym's rules): −1 per step until the car reaches the flag
(position ≥ 0.5), 0 on the step that reaches it; two policies to compare.

State: position, velocity. Actions: 0 push left, 1 no push, 2 push right.
"""

import jax.numpy as jnp

GOAL_POSITION = 0.5
GOAL_VELOCITY = 0.0


def terminated(next_obs):
    """The car reached the flag."""
    return (next_obs[0] >= GOAL_POSITION) & (next_obs[1] >= GOAL_VELOCITY)


def reward(obs, action, next_obs):
    """−1 per step, 0 for the step that reaches the flag."""
    return jnp.where(terminated(next_obs), 0.0, -1.0)


def pump(key, obs):
    """Push with the car's velocity: builds up the swing that climbs the hill."""
    return jnp.where(obs[1] >= 0.0, 2, 0).astype(jnp.int32)


def push_left(key, obs):
    """Always push left: never reaches the flag on the right."""
    return jnp.int32(0)
