"""JAX-native heterogeneous environments of the paper: one param set per agent.

    env = envs.make("cartpole")
    covariates = env.sample_agents(key, 500)       # (500, 2): force, length
    params = env.agent_params(covariates)          # leaves of shape (500,)
    obs, state = jax.vmap(env.reset)(keys, params)
    obs, state, reward, done, info = jax.vmap(env.step)(keys, state, actions, params)
"""

from __future__ import annotations

from envs.agents import AgentSpec
from envs.base import HeterogeneousEnv

ENV_NAMES = ("mountaincar", "cartpole", "halfcheetah")


def make(name: str, **kwargs) -> HeterogeneousEnv:
    """Returns the environment called `name` (one of ENV_NAMES).

    Keyword arguments go to the environment's constructor (e.g.
    `ctrl_cost_weight` for HalfCheetah).
    """
    key = str(name).lower()
    if key == "mountaincar":
        from envs.mountaincar import MountainCar
        return MountainCar(**kwargs)
    if key == "cartpole":
        from envs.cartpole import CartPole
        return CartPole(**kwargs)
    if key == "halfcheetah":
        # Imported lazily: MuJoCo/MJX take seconds to import.
        from envs.halfcheetah import HalfCheetah
        return HalfCheetah(**kwargs)
    raise ValueError(f"unknown environment {name!r}; valid names: {', '.join(ENV_NAMES)}")


__all__ = ["AgentSpec", "ENV_NAMES", "HeterogeneousEnv", "make"]
