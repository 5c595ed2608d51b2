"""The true dynamics on MuJoCo's C simulator, for planning on a CPU.

    dynamics = mujoco_dynamics(env, covariates)     # like dynamics.env_dynamics
    next_obs = dynamics(obs, action)                # (1, B, D)

MJX is MuJoCo's pipeline written in JAX: on an accelerator thousands of
candidate rollouts run as one vectorised program, but on a CPU its many small
operations are far slower than MuJoCo's own C code. Here the planner's states
leave the compiled program through `jax.pure_callback`, are stepped by
`mujoco.rollout` (the C simulator, on a pool of native threads) and come back
as the next observations. The callback is vmapped with
`vmap_method="broadcast_all"`, so when the evaluation vmaps the planner over
agents, episodes and candidates, one host call receives every row of that
step at once, each row with its own agent's covariates.

The step is the env's `step_env` from the state `env.state_from_obs`
rebuilds: `env.frame_skip` physics steps with the clipped action held, from
a zero solver warm start. MJX computes it in float32, the C simulator in
float64 (tests/test_true_env_mujoco.py compares the two).

An env offers this physics by implementing `c_model_for_covariates(covariates
(P,)) -> mujoco.MjModel`, `c_state_from_obs(obs (N, D)) -> (N, S)` MuJoCo
full-physics states and `obs_from_c_state(state (N, S)) -> (N, D)`, and a
`frame_skip` (HalfCheetah does; the classic-control envs are gymnax's).
"""

from __future__ import annotations

import threading
import weakref

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from mujoco import rollout as mujoco_rollout

from persim_jax.runtime import available_cores
from persim_jax.types import Dynamics

# The MuJoCo state the rollouts start from and return: time, qpos, qvel,
# act (and plugin state), all of what the next physics step reads besides
# the control and the solver's warm start (given separately, as zeros).
FULL_PHYSICS = mujoco.mjtState.mjSTATE_FULLPHYSICS.value


def has_c_physics(env) -> bool:
    """Whether `env` offers its physics to the C simulator (see the module
    docstring)."""
    return all(hasattr(env, name) for name in (
        "c_model_for_covariates", "c_state_from_obs", "obs_from_c_state", "frame_skip"))


class HostPhysics:
    """The C simulator of one env, shared by every call of its dynamics.

    Holds one `mujoco.MjModel` per agent (built on first use and kept, keyed
    by the agent's float32 covariates), one `mujoco.MjData` per thread, and
    one `mujoco.rollout.Rollout` thread pool. A lock serialises calls: with
    several JAX CPU devices each device's program calls back on its own
    thread, and the pool and its data are not reentrant.
    """

    def __init__(self, env, num_threads: int | None = None):
        if not has_c_physics(env):
            raise ValueError(f"env: {env.name} has no MuJoCo C model (c_model_for_covariates, "
                             f"c_state_from_obs, obs_from_c_state, frame_skip)")
        self.env = env
        self.frame_skip = int(env.frame_skip)
        self.num_threads = available_cores() if num_threads is None else int(num_threads)
        base = env.c_model_for_covariates(env.default_agent)
        self.state_size = mujoco.mj_stateSize(base, FULL_PHYSICS)
        self.num_dofs = base.nv
        self.num_controls = base.nu
        self.ctrl_low = base.actuator_ctrlrange[:, 0].copy()
        self.ctrl_high = base.actuator_ctrlrange[:, 1].copy()
        self.models: dict[bytes, mujoco.MjModel] = {}
        self.data = [mujoco.MjData(base) for _ in range(max(self.num_threads, 1))]
        self.pool = mujoco_rollout.Rollout(nthread=self.num_threads)
        self.lock = threading.Lock()

    def model(self, covariates: np.ndarray) -> mujoco.MjModel:
        """The cached C model of the agent with covariates (P,) float32."""
        key = covariates.tobytes()
        model = self.models.get(key)
        if model is None:
            model = self.models[key] = self.env.c_model_for_covariates(covariates)
        return model

    def step(self, obs, action, covariates) -> np.ndarray:
        """(..., D) float32 next observations of obs (..., D) under action
        (..., A) for the agents covariates (..., P), any leading shape (one
        row per transition)."""
        obs, action, covariates = (np.asarray(x) for x in (obs, action, covariates))
        lead = obs.shape[:-1]
        obs = obs.reshape(-1, obs.shape[-1])
        rows = obs.shape[0]
        covariates = np.ascontiguousarray(covariates.reshape(rows, -1), np.float32)
        # The agents in a batch are few (one per vmapped agent): find each
        # distinct covariate row once, then hand every row its agent's model.
        agents, which = np.unique(covariates, axis=0, return_inverse=True)
        agent_models = [self.model(agents[i]) for i in range(agents.shape[0])]
        models = [agent_models[i] for i in which.reshape(-1)]
        # MuJoCo clamps ctrl to its range too; clipping here makes the held
        # control the env's clipped action exactly.
        control = np.clip(action.reshape(rows, 1, -1).astype(np.float64), self.ctrl_low,
                          self.ctrl_high)
        initial = np.ascontiguousarray(self.env.c_state_from_obs(obs), np.float64)
        if initial.shape != (rows, self.state_size):
            raise ValueError(f"c_state_from_obs: expected ({rows}, {self.state_size}) states; "
                             f"got {initial.shape}")
        control = np.ascontiguousarray(np.broadcast_to(
            control, (rows, self.frame_skip, self.num_controls)))
        warmstart = np.zeros((rows, self.num_dofs), np.float64)
        state = np.empty((rows, self.frame_skip, self.state_size), np.float64)
        sensordata = np.empty((rows, self.frame_skip, 0), np.float64)
        with self.lock:
            self.pool.rollout(models, self.data, initial, control, nstep=self.frame_skip,
                              initial_warmstart=warmstart, state=state, sensordata=sensordata)
        next_obs = self.env.obs_from_c_state(state[:, -1])
        return next_obs.astype(np.float32).reshape(*lead, -1)


# One `HostPhysics` per env object, released with the env.
_HOSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_HOSTS_LOCK = threading.Lock()


def host_physics(env) -> HostPhysics:
    """The shared `HostPhysics` of `env` (created on first use)."""
    with _HOSTS_LOCK:
        host = _HOSTS.get(env)
        if host is None:
            host = _HOSTS[env] = HostPhysics(env)
        return host


def mujoco_dynamics(env, covariates) -> Dynamics:
    """The true dynamics of one agent (M = 1) on MuJoCo's C simulator.

    The same step as `dynamics.env_dynamics(env, env.covariates_to_params(
    covariates))` (to the float32 rounding of MJX), computed on the host by
    `mujoco.rollout`. Jittable; vmappable over covariates and states (the
    vmapped rows reach the host in one call).

    Args:
      env: an env with C physics (`has_c_physics`).
      covariates: (P,) the agent's covariates (may be traced).

    Returns:
      dynamics(obs (B, D) or (1, B, D), action (B, A)) -> (1, B, D) float32.
    """
    host = host_physics(env)
    covariates = jnp.asarray(covariates, jnp.float32)

    def dynamics(obs, action):
        if obs.ndim == 3:
            if obs.shape[0] != 1:
                raise ValueError(f"obs: the true env has one member; got {obs.shape[0]}")
            obs = obs[0]
        rows = obs.shape[0]
        agent = jnp.broadcast_to(covariates, (rows, covariates.shape[-1]))
        next_obs = jax.pure_callback(
            host.step, jax.ShapeDtypeStruct(obs.shape, jnp.float32),
            obs.astype(jnp.float32), jnp.asarray(action, jnp.float32), agent,
            vmap_method="broadcast_all")
        return next_obs[None]

    return dynamics
