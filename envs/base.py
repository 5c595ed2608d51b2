"""What every heterogeneous environment of persim-jax shares.

Environments follow gymnax: no mutable state, `flax.struct` params and state,
pure `reset(key, params)` / `step(key, state, action, params)`. The per-agent
physics lives in `params`, so `jax.vmap(env.step)` over a batch of params
steps many different agents in one call.
"""

from __future__ import annotations

import abc
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gymnax.environments import environment

from envs.agents import AgentSpec


class HeterogeneousEnv(environment.Environment, abc.ABC):
    """A gymnax environment whose physics is set by per-agent covariates.

    Subclasses set `agents`, `max_episode_steps`, `obs_dim`, and implement
    `_params_from_covariates`, `reward`, `terminated` and `state_from_obs`.
    """

    agents: AgentSpec
    max_episode_steps: int
    obs_dim: int
    # Discrete envs: number of actions; continuous envs: None and `action_dim`.
    discrete_actions: bool = True

    # -- agents ---------------------------------------------------------------

    @property
    def covariate_names(self) -> tuple[str, ...]:
        return self.agents.names

    @property
    def covariate_ranges(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.agents.low, self.agents.high))

    @property
    def test_agents(self) -> np.ndarray:
        """(5, P) the paper's test agents (dataset units 0..4)."""
        return np.asarray(self.agents.test_agents)

    @property
    def policy_training_agents(self) -> np.ndarray:
        """(K, P) agents the pure logging policies are trained on."""
        return np.asarray(self.agents.policy_training_agents)

    @property
    def default_agent(self) -> np.ndarray:
        """(P,) the default agent."""
        return np.asarray(self.agents.default)

    def sample_agents(self, key: jax.Array, num_agents: int) -> jax.Array:
        """(num_agents, P) covariates; units 0..4 are the test agents, the rest
        uniform in the paper's ranges."""
        return self.agents.sample(key, num_agents)

    def agent_params(self, covariates, *, allow_extrapolation: bool = False):
        """Environment params for one agent (P,) or a batch (N, P).

        Validates on the host (see `AgentSpec.validate`), then builds params
        whose every leaf has the batch shape `()` or `(N,)`, so that
        `jax.vmap(env.step, in_axes=(0, 0, 0, 0))` takes them as they are.
        Derived physical quantities are recomputed from the covariates.
        """
        values = self.agents.validate(covariates, allow_extrapolation=allow_extrapolation)
        # float32 by default, float64 under jax_enable_x64 (used by the reference tests).
        return self.covariates_to_params(jnp.asarray(values))

    def covariates_to_params(self, covariates: jax.Array):
        """Jittable, unvalidated: (..., P) covariates -> params with leaves of
        shape (...). Use `agent_params` at the edge of the library."""
        params = self._params_from_covariates(covariates)
        batch_shape = jnp.shape(covariates)[:-1]
        return jax.tree.map(lambda leaf: jnp.broadcast_to(jnp.asarray(leaf), batch_shape), params)

    @abc.abstractmethod
    def _params_from_covariates(self, covariates: jax.Array):
        """(..., P) covariates -> params; leaves may be scalars or (...)."""

    @property
    def default_params(self):
        return self.covariates_to_params(jnp.asarray(self.agents.default))

    # -- known reward and termination (used by the planner on predictions) ----

    @abc.abstractmethod
    def reward(self, obs: jax.Array, action: jax.Array, next_obs: jax.Array) -> jax.Array:
        """Reward of the transition obs (D,) --action--> next_obs (D,); scalar."""

    @abc.abstractmethod
    def terminated(self, next_obs: jax.Array) -> jax.Array:
        """Whether next_obs (D,) ends the episode (not counting the time cap)."""

    # -- planning on the true dynamics ----------------------------------------

    @abc.abstractmethod
    def state_from_obs(self, obs: jax.Array, params: Any = None) -> Any:
        """The env state whose observation is obs (D,), for planning rollouts.

        The state is at time 0, so the episode cap never fires inside a
        rollout. `params` are one agent's physics (leaves of shape ()), or None
        for the default agent; envs whose state is the observation ignore them.
        Exact when the observation holds the whole state; otherwise each env
        documents what it sets (`planning.env_dynamics` steps from it).
        """

    # -- gymnax API -----------------------------------------------------------

    @functools.partial(jax.jit, static_argnames=("self",))
    def step(
        self,
        key: jax.Array,
        state: Any,
        action: jax.Array,
        params: Any = None,
    ) -> tuple[jax.Array, Any, jax.Array, jax.Array, dict[str, Any]]:
        """Steps one agent and auto-resets at the end of an episode.

        Returns:
          obs (D,): the next observation, or the reset observation if done.
          state: the next state (reset if done).
          reward (): the transition's reward.
          done (): terminated or truncated (time cap).
          info: `terminated`, `truncated` and `final_observation` (the next
            observation before any reset), `discount`.
        """
        obs, state, reward, terminated, truncated, info = super().step(
            key, state, action, params)
        return obs, state, reward, jnp.logical_or(terminated, truncated), info
