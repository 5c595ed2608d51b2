"""MountainCar with per-agent gravity, on gymnax's physics.

The paper varies gravity in [0.0001, 0.0035] (Table 1), caps episodes at 500
steps, and rewards -1 per step and 0 on the step that reaches the goal.
"""

from __future__ import annotations

import jax.numpy as jnp
from gymnax.environments.classic_control import mountain_car

from envs.agents import AgentSpec
from envs.base import HeterogeneousEnv

EnvParams = mountain_car.EnvParams
EnvState = mountain_car.EnvState

GOAL_POSITION = 0.5
GOAL_VELOCITY = 0.0

AGENTS = AgentSpec(
    names=("gravity",),
    low=(0.0001,),
    high=(0.0035,),
    test_agents=((0.0001,), (0.0005,), (0.0010,), (0.0025,), (0.0035,)),
    policy_training_agents=((0.0003,), (0.00075,), (0.00175,), (0.0025,), (0.0030,)),
    default=(0.0025,),
)


class MountainCar(HeterogeneousEnv, mountain_car.MountainCar):
    """MountainCar-v0 physics (gymnax) with gravity set per agent.

    Observation (2,): position, velocity. Actions: 0 push left, 1 none, 2 push
    right. Episode cap 500 steps.
    """

    agents = AGENTS
    max_episode_steps = 500
    obs_dim = 2

    def _params_from_covariates(self, covariates):
        return EnvParams(gravity=covariates[..., 0], max_steps_in_episode=self.max_episode_steps)

    def step_env(self, key, state, action, params):
        obs = self.get_obs(state)
        next_obs, next_state, _, terminated, info = super().step_env(key, state, action, params)
        return next_obs, next_state, self.reward(obs, action, next_obs), terminated, info

    def reward(self, obs, action, next_obs):
        """-1 per step, 0 on the step that reaches the goal (paper, E.1)."""
        del obs, action
        return jnp.where(self.terminated(next_obs), 0.0, -1.0)

    def terminated(self, next_obs):
        return jnp.logical_and(next_obs[..., 0] >= GOAL_POSITION, next_obs[..., 1] >= GOAL_VELOCITY)

    def state_from_obs(self, obs, params=None):
        """The state (position, velocity) is the observation: exact; time 0."""
        del params
        obs = jnp.asarray(obs)
        return EnvState(position=obs[0], velocity=obs[1], time=jnp.zeros((), jnp.int32))

    @property
    def name(self) -> str:
        return "mountaincar"
