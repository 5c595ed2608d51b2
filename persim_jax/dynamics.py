"""Dynamics adapters: a learned simulator or the true environment as the
`Dynamics` of one agent, and as the `DynamicsForAgent` the evaluation
protocols take (the contracts are in `persim_jax.types`).

    dynamics = simulator_dynamics(simulator, agent_id)      # M members, for planning
    dynamics = env_dynamics(env, params)                    # M = 1, the true physics
    for_agent = simulator_dynamics_for_agent(simulator)     # PerSim
    for_agent = true_env_dynamics_for_agent(env)            # "True env + MPC"
                                  # (HalfCheetah on a CPU: MuJoCo's C simulator)
    model = contextual(dynamics)     # a ContextualDynamics (empty context if plain)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from persim_jax import mujoco_physics
from persim_jax.persim import model
from persim_jax.types import ContextualDynamics, Dynamics

# ---------------------------------------------------------------------------
# Dynamics of one agent


def simulator_dynamics(simulator, agent_id) -> Dynamics:
    """The dynamics of agent `agent_id` under every member of `simulator`.

    Equal (to float32 rounding) to `simulator.predict` / `predict_members`,
    with the work that does not depend on states or candidates hoisted out of
    the rollout (see `model.fold_member`). Jittable and vmappable over agent_id.

    Args:
      simulator: a trained `persim_jax.Simulator` (M members).
      agent_id: () int, the agent's index 0..N−1 in the simulator.

    Returns:
      dynamics(obs (B, D) or (M, B, D), action (B,) / (B, A)) -> (M, B, D).
    """
    config = simulator.config
    folded = jax.vmap(model.fold_member, in_axes=(0, None, None, None))(
        simulator.params, simulator.stats, config, jnp.asarray(agent_id, jnp.int32))

    def dynamics(obs, action):
        obs_axis = 0 if obs.ndim == 3 else None
        return jax.vmap(model.folded_next_obs, in_axes=(0, None, obs_axis, None))(
            folded, config, obs, action)

    return dynamics


def env_dynamics(env, params) -> Dynamics:
    """The true dynamics of one agent (M = 1), from `env.step_env`.

    Each next state is one `env.step_env` (vmapped over B) from the state
    rebuilt by `env.state_from_obs` with the agent's physics `params` (leaves of
    shape ()). The episode cap and the env's own `done` are ignored: the
    planner applies `env.terminated` to the predicted states. The env's key
    is fixed: the environments are deterministic.

    Returns:
      dynamics(obs (B, D) or (1, B, D), action (B,) / (B, A)) -> (1, B, D).
    """
    key = jax.random.PRNGKey(0)

    def one(obs, action):
        state = env.state_from_obs(obs, params)
        next_obs, _, _, _, _ = env.step_env(key, state, action, params)
        return next_obs.astype(jnp.float32)

    def dynamics(obs, action):
        if obs.ndim == 3:
            if obs.shape[0] != 1:
                raise ValueError(f"obs: the true env has one member; got {obs.shape[0]}")
            obs = obs[0]
        return jax.vmap(one)(obs, action)[None]

    return dynamics


# ---------------------------------------------------------------------------
# Contextual dynamics


class Fixed(NamedTuple):
    """A plain dynamics as a `ContextualDynamics` whose context is empty."""

    fixed: Any

    def init(self, key):
        return ()

    def observe(self, context, obs, action, next_obs):
        return context

    def dynamics(self, context):
        return self.fixed


def contextual(dynamics) -> ContextualDynamics:
    """`dynamics` itself if it is a `ContextualDynamics`, else a wrapper
    with an empty context."""
    if isinstance(dynamics, ContextualDynamics):
        return dynamics
    return Fixed(dynamics)


# ---------------------------------------------------------------------------
# Dynamics for agent: a learned simulator


@struct.dataclass
class SimulatorDynamicsForAgent:
    """Agent index -> that agent's learned dynamics (all M members).

    A pytree, so `evaluation.run_episodes` passes the simulator's parameters
    to the compiled program as arguments (not as baked-in constants).

    Attributes:
      simulator: the trained `Simulator` (or any ensemble with its
        `predict` / `predict_members`, `num_agents` and `obs_dim`).
      agent_ids: (A,) simulator agent index of each row of the covariates
        given to the protocols, or None when row i is simulator agent i (the
        test agents are dataset units 0..4).
      fold: plan on `simulator_dynamics`, the forward pass with the agent
        factor and the normalisation folded into the weights (faster; equal
        to float32 rounding); False runs `Simulator.predict_members` as it is
        (the prediction protocol's choice: its errors are the model's own).
    """

    simulator: Any
    agent_ids: jax.Array | None = None
    fold: bool = struct.field(pytree_node=False, default=True)

    def __call__(self, agent_index, covariates) -> Dynamics:
        del covariates  # the simulator knows the agent by its id only
        agent = agent_index if self.agent_ids is None else self.agent_ids[agent_index]
        if self.fold:
            return simulator_dynamics(self.simulator, agent)
        simulator = self.simulator

        def dynamics(obs, action):
            if obs.ndim == 3:
                return simulator.predict_members(agent, obs, action)
            return simulator.predict(agent, obs, action)

        return dynamics

    def check(self, env, num_rows: int) -> None:
        """ValueError unless the simulator fits `env` (state size, action
        type) and maps each of `num_rows` covariate rows to one of its agents."""
        simulator = self.simulator
        if simulator.obs_dim != env.obs_dim:
            raise ValueError(f"simulator: predicts {simulator.obs_dim}-d states; {env.name} has "
                             f"{env.obs_dim}")
        if simulator.config.discrete != bool(env.discrete_actions):
            raise ValueError(f"simulator: its action type (discrete={simulator.config.discrete}) "
                             f"does not match {env.name}'s")
        ids = np.arange(num_rows) if self.agent_ids is None else np.asarray(self.agent_ids)
        if ids.shape != (num_rows,):
            raise ValueError(f"agent_ids: must be {num_rows} integers (one per row of "
                             f"covariates); got {ids.tolist()}")
        if ids.min() < 0 or ids.max() >= simulator.num_agents:
            raise ValueError(f"agent_ids: must be in 0..{simulator.num_agents - 1}; got "
                             f"{ids.tolist()}")


def simulator_dynamics_for_agent(simulator, agent_ids: Sequence[int] | None = None, *,
                                 fold: bool = True) -> SimulatorDynamicsForAgent:
    """`DynamicsForAgent` of a learned simulator (PerSim's planning).

    Args:
      simulator: a `persim_jax.Simulator`.
      agent_ids: simulator agent index of each evaluated agent (row of
        `covariates`); default: row i is agent i.
      fold: see `SimulatorDynamicsForAgent`.
    """
    if agent_ids is not None:
        ids = np.asarray(agent_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"agent_ids: must be a 1-d integer sequence; got {agent_ids!r}")
        if ids.size and (ids.min() < 0 or ids.max() >= simulator.num_agents):
            raise ValueError(f"agent_ids: must be in 0..{simulator.num_agents - 1}; got "
                             f"{ids.tolist()}")
        agent_ids = jnp.asarray(ids, jnp.int32)
    return SimulatorDynamicsForAgent(simulator, agent_ids, fold)


# ---------------------------------------------------------------------------
# Dynamics for agent: the true environment ("True env + MPC")


# The true env's physics engines: MJX (JAX, jittable anywhere) or MuJoCo's C
# simulator through `mujoco.rollout` (host threads; faster on a CPU).
PHYSICS = ("auto", "mjx", "mujoco")


def resolve_physics(env, physics: str = "auto") -> str:
    """The engine "auto" stands for: "mujoco" on the CPU backend for an env
    with a C model (`mujoco_physics.has_c_physics`), else "mjx" (accelerators
    keep MJX; gymnax's classic-control envs have only their JAX step, named
    "mjx" here too). ValueError for an unknown name or "mujoco" on an env
    without a C model."""
    if physics not in PHYSICS:
        raise ValueError(f"physics: must be one of {', '.join(PHYSICS)}; got {physics!r}")
    has_c = mujoco_physics.has_c_physics(env)
    if physics == "auto":
        return "mujoco" if has_c and jax.default_backend() == "cpu" else "mjx"
    if physics == "mujoco" and not has_c:
        raise ValueError(f"physics: {env.name} has no MuJoCo C model; use 'mjx' or 'auto'")
    return physics


@struct.dataclass
class TrueEnvDynamicsForAgent:
    """Agent covariates -> the true env's dynamics with that agent's physics
    (one member; see `env_dynamics`, `HeterogeneousEnv.state_from_obs`).

    Attributes:
      env: the environment.
      physics: "mjx": the env's own JAX step (`env_dynamics`); "mujoco":
        MuJoCo's C simulator on host threads
        (`mujoco_physics.mujoco_dynamics`), the same step to float32
        rounding.

    Equal for equal envs and physics, so repeated `evaluation.run_episodes`
    calls reuse one compiled program."""

    env: Any = struct.field(pytree_node=False)
    physics: str = struct.field(pytree_node=False, default="mjx")

    def __call__(self, agent_index, covariates) -> Dynamics:
        del agent_index
        if self.physics == "mujoco":
            return mujoco_physics.mujoco_dynamics(self.env, covariates)
        return env_dynamics(self.env, self.env.covariates_to_params(covariates))


def true_env_dynamics_for_agent(env, physics: str = "auto") -> TrueEnvDynamicsForAgent:
    """`DynamicsForAgent` of the true environment ("True env + MPC"): each
    agent's own physics from its covariates, one member; `physics` "auto",
    "mjx" or "mujoco" (see `resolve_physics`)."""
    return TrueEnvDynamicsForAgent(env, resolve_physics(env, physics))
