"""CartPole with per-agent push force and pole length, on gymnax's physics.

The paper (after CaDM, Lee et al. 2020) varies the push force in [2, 18] and
the pole (half-)length in [0.15, 0.85] (Table 1); episodes are capped at 200
steps with reward 1 per step, the terminal step included.
"""

from __future__ import annotations

import jax.numpy as jnp
from gymnax.environments.classic_control import cartpole

from envs.agents import AgentSpec
from envs.base import HeterogeneousEnv

EnvParams = cartpole.EnvParams
EnvState = cartpole.EnvState

_DEFAULTS = EnvParams()
X_THRESHOLD = _DEFAULTS.x_threshold
THETA_THRESHOLD = 12 * 2 * jnp.pi / 360

AGENTS = AgentSpec(
    names=("force", "length"),
    low=(2.0, 0.15),
    high=(18.0, 0.85),
    test_agents=((2.0, 0.5), (10.0, 0.5), (18.0, 0.5), (10.0, 0.85), (10.0, 0.15)),
    policy_training_agents=((6.0, 0.5), (14.0, 0.5), (10.0, 0.5), (10.0, 0.675), (10.0, 0.325)),
    default=(10.0, 0.5),
)


class CartPole(HeterogeneousEnv, cartpole.CartPole):
    """CartPole (gymnax's Barto-Sutton-Anderson physics) with per-agent
    `force_mag` and `length`.

    Observation (4,): x, x_dot, theta, theta_dot. Actions: 0 push left (-F),
    1 push right (+F). Episode cap 200 steps.
    """

    agents = AGENTS
    max_episode_steps = 200
    obs_dim = 4

    def _params_from_covariates(self, covariates):
        force, length = covariates[..., 0], covariates[..., 1]
        return EnvParams(
            force_mag=force,
            length=length,
            # gymnax keeps these derived fields; they must follow the agent.
            polemass_length=_DEFAULTS.masspole * length,
            total_mass=_DEFAULTS.masscart + _DEFAULTS.masspole,
            max_steps_in_episode=self.max_episode_steps,
        )

    def reward(self, obs, action, next_obs):
        """1 on every step, the terminal one included (gym, gymnax)."""
        del obs, action
        return jnp.ones(jnp.shape(next_obs)[:-1], jnp.float32)

    def terminated(self, next_obs):
        x, theta = next_obs[..., 0], next_obs[..., 2]
        return jnp.logical_or(jnp.abs(x) > X_THRESHOLD, jnp.abs(theta) > THETA_THRESHOLD)

    def state_from_obs(self, obs, params=None):
        """The state (x, x_dot, theta, theta_dot) is the observation: exact;
        time 0."""
        del params
        obs = jnp.asarray(obs)
        return EnvState(x=obs[0], x_dot=obs[1], theta=obs[2], theta_dot=obs[3],
                        time=jnp.zeros((), jnp.int32))

    @property
    def name(self) -> str:
        return "cartpole"
