"""HalfCheetah with per-agent mass and damping scales, on MuJoCo MJX.

The physics is gym's `half_cheetah.xml`, loaded from the installed gymnasium
package (not copied here): timestep 0.01 s, 5 substeps per environment step,
so one step lasts dt = 0.05 s. It is simulated by MJX, MuJoCo's own
reimplementation of its pipeline in JAX (collision, the Newton constraint
solver and Euler integration are JAX code, not calls into the C library), so
`step` is jittable and `jax.vmap(env.step)` steps many cheetahs at once.

Choices, after the authors' code (`docs/authors-code.md` 1.3):

- Heterogeneity: agent (mass_scale m, damping_scale d) multiplies the mass of
  every body by m and the damping of every dof by d. Nothing else changes:
  the inertias stay those of the default model and no constants are
  recomputed (no `mj_setConst`), as the authors' code writes
  `model.body_mass` directly. The per-agent `mjx.Model` is built inside the
  step from the params, so vmapping over params vmaps the model.
- Observation (18,): obs[0] is the torso x-velocity as a finite difference
  of rootx over the environment step (0 at reset); obs[1:9] = qpos[1:9];
  obs[9:18] = qvel[0:9]. The torso x-position is not observed.
- Reward: next_obs[0] - ctrl_cost_weight * sum(action**2) with the weight 0.1
  of the authors' code (the paper's text says 0.05; pass `ctrl_cost_weight`).
  The action is clipped to [-1, 1] first, as MuJoCo clamps ctrl to its
  ctrlrange; the cost is charged on the applied action (the authors charged
  the raw one; the two agree for actions inside the box).
- Reset: qpos and qvel are the model's initial ones plus N(0, 0.001^2) noise
  on all 9 entries (the authors' noise, not gym's).
- Episodes last 1000 steps (paper, Table 8; the authors' loop ran 1001) and
  never terminate early.
- Instability: as MuJoCo's C simulator (and so gym's env) does, a substep
  whose qpos, qvel or qacc holds a NaN or a value beyond mjMAXVAL (1e10)
  resets the simulation to qpos0 at rest with zero ctrl, and the episode goes
  on from there (MJX itself does not check). obs[0] and the reward of that
  step then difference rootx against the pre-reset position, as gym's would.

The whole `mjx.Data` is kept in the state, so the solver's warm start
(`qacc_warmstart`) carries over from step to step as in the C simulator.

Precision: the env computes in float32 unless it is built and used under
`jax.enable_x64(True)`, which puts the MJX model in float64. Stepped from the
same state, MJX-float64 reproduces `mujoco.mj_step` to ~1e-13 and
MJX-float32 to ~1e-6 (rarely 1e-3: stiff contacts solved in float32). Whole
trajectories of either part from C's after tens of steps, since the
random-action gait is chaotic (see tests/test_halfcheetah.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
from typing import Any

import gymnasium
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct
from gymnax.environments import spaces

# MJX prints "Failed to import warp: ..." to stdout when the optional Warp
# backend is absent; keep stdout for the programs' own output (JSON lines).
with contextlib.redirect_stdout(sys.stderr):
    from mujoco import mjx

from envs.agents import AgentSpec
from envs.base import HeterogeneousEnv

MODEL_PATH = os.path.join(os.path.dirname(gymnasium.__file__), "envs/mujoco/assets/half_cheetah.xml")
FRAME_SKIP = 5
RESET_NOISE_SCALE = 0.001
CTRL_COST_WEIGHT = 0.1

AGENTS = AgentSpec(
    names=("mass_scale", "damping_scale"),
    low=(0.2, 0.2),
    high=(1.8, 1.8),
    test_agents=((0.3, 1.7), (1.7, 0.3), (0.3, 0.3), (1.7, 1.7), (1.0, 1.0)),
    policy_training_agents=((0.6, 1.4), (1.4, 0.6), (0.6, 0.6), (1.4, 1.4)),
    default=(1.0, 1.0),
)


def _is_bad(x: jax.Array) -> jax.Array:
    """() whether x holds a NaN or a magnitude above MuJoCo's mjMAXVAL (1e10),
    C MuJoCo's test for an unstable simulation (`mju_isBad`)."""
    return ~jnp.all(jnp.abs(x) <= mujoco.mjMAXVAL)


@struct.dataclass
class EnvParams:
    """One agent's physics; every leaf has shape () or, for a batch, (N,)."""

    mass_scale: Any = 1.0
    damping_scale: Any = 1.0
    max_steps_in_episode: Any = 1000


@struct.dataclass
class EnvState:
    """Simulator state.

    Attributes:
      data: the full `mjx.Data` (qpos (9,), qvel (9,), the solver's warm
        start, ...).
      x_velocity: () finite-difference rootx velocity over the last
        environment step; 0 after a reset. It is obs[0].
      time: () number of environment steps since the reset.
    """

    data: mjx.Data
    x_velocity: jax.Array
    time: jax.Array


def load_mj_model() -> mujoco.MjModel:
    """Compiles gym's half_cheetah.xml into a fresh `mujoco.MjModel`.

    The file's `settotalmass` attribute makes MuJoCo warn that it is
    deprecated; it still gives gym's (and the authors') masses, so that one
    warning is dropped and any other is passed on as a Python warning.
    """
    messages: list[str] = []
    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(messages.append)
    try:
        model = mujoco.MjModel.from_xml_path(MODEL_PATH)
    finally:
        mujoco.set_mju_user_warning(previous)
    for message in messages:
        if "settotalmass" not in message:
            warnings.warn(f"MuJoCo: {message}", stacklevel=2)
    return model


class HalfCheetah(HeterogeneousEnv):
    """gym's HalfCheetah (MJX) with per-agent body-mass and dof-damping scales.

    Observation (18,): finite-difference torso x-velocity, qpos[1:9],
    qvel[0:9]. Action (6,) in [-1, 1]: torques of bthigh, bshin, bfoot,
    fthigh, fshin, ffoot (times the actuator gears). Episode cap 1000 steps.

    Attributes:
      mj_model: the default agent's `mujoco.MjModel` (C); see `c_model_for`.
      mjx_model: the default agent's `mjx.Model`; see `model_for`.
      ctrl_cost_weight: weight of the squared-action cost in the reward.
    """

    agents = AGENTS
    max_episode_steps = 1000
    obs_dim = 18
    action_dim = 6
    discrete_actions = False

    def __init__(self, ctrl_cost_weight: float = CTRL_COST_WEIGHT):
        super().__init__()
        if not (float(ctrl_cost_weight) >= 0.0 and math.isfinite(ctrl_cost_weight)):
            raise ValueError(f"ctrl_cost_weight must be a finite number >= 0, got {ctrl_cost_weight!r}")
        self.ctrl_cost_weight = float(ctrl_cost_weight)
        self.mj_model = load_mj_model()
        # impl="jax": MJX's JAX pipeline, which runs on CPU and under vmap.
        # The arrays take the dtype in force now (float64 under jax_enable_x64).
        self.mjx_model = mjx.put_model(self.mj_model, impl="jax")
        self.frame_skip = FRAME_SKIP

    # -- physics --------------------------------------------------------------

    @property
    def dt(self) -> float:
        """Duration of one environment step in seconds (0.05)."""
        return float(self.mj_model.opt.timestep) * self.frame_skip

    def model_for(self, params: EnvParams) -> mjx.Model:
        """The `mjx.Model` of the agent(s) `params`.

        With leaves of shape (), `body_mass` is (8,) and `dof_damping` (9,);
        with leaves of shape (N,) they are (N, 8) and (N, 9). Inside
        `vmap(env.step)` over params this is the per-agent model, so the one
        vectorised call steps every agent with its own physics.
        """
        base = self.mjx_model
        mass_scale = jnp.asarray(params.mass_scale)[..., None]
        damping_scale = jnp.asarray(params.damping_scale)[..., None]
        return base.replace(
            body_mass=base.body_mass * mass_scale,
            dof_damping=base.dof_damping * damping_scale,
        )

    def c_model_for(self, mass_scale: float, damping_scale: float) -> mujoco.MjModel:
        """A copy of the C `mujoco.MjModel` scaled as `model_for` scales the
        MJX one (for `mujoco.mj_step` references)."""
        model = copy.copy(self.mj_model)
        model.body_mass[:] = self.mj_model.body_mass * mass_scale
        model.dof_damping[:] = self.mj_model.dof_damping * damping_scale
        return model

    # -- the same physics on MuJoCo's C simulator (host side, numpy) -----------
    # What `persim_jax.mujoco_physics` needs to step the planner's states with
    # `mujoco.rollout` instead of MJX: the C model of an agent, and the
    # observation <-> MuJoCo state maps of `state_from_obs` / `get_obs`.

    def c_model_for_covariates(self, covariates) -> mujoco.MjModel:
        """`c_model_for` the agent whose covariates are (mass_scale,
        damping_scale) (2,)."""
        mass_scale, damping_scale = (float(v) for v in covariates)
        return self.c_model_for(mass_scale, damping_scale)

    def c_state_from_obs(self, obs) -> np.ndarray:
        """(N, 19) float64 MuJoCo states (`mjSTATE_FULLPHYSICS`: time, qpos
        (9,), qvel (9,)) of obs (N, 18), as `state_from_obs` rebuilds them:
        time 0, torso x 0, qpos[1:] = obs[1:9], qvel = obs[9:18]."""
        obs = np.asarray(obs, np.float64)
        state = np.zeros((obs.shape[0], 1 + self.obs_dim), np.float64)
        state[:, 2:] = obs[:, 1:]
        return state

    def obs_from_c_state(self, state) -> np.ndarray:
        """(N, 18) observations of MuJoCo states (N, 19) reached by one env
        step from `c_state_from_obs` (whose torso x was 0, so obs[0], the x
        displacement over the step divided by dt, is qpos[0] / dt)."""
        state = np.asarray(state)
        return np.concatenate([state[:, 1:2] / self.dt, state[:, 2:]], axis=1)

    def _params_from_covariates(self, covariates):
        return EnvParams(
            mass_scale=covariates[..., 0],
            damping_scale=covariates[..., 1],
            max_steps_in_episode=self.max_episode_steps,
        )

    # -- gymnax API -----------------------------------------------------------

    def step_env(self, key, state, action, params):
        """One environment step (5 MuJoCo substeps) of one agent.

        Args:
          key: unused (the dynamics are deterministic).
          state: `EnvState`.
          action: (6,) torques; clipped to [-1, 1].
          params: `EnvParams` with leaves of shape ().

        Returns:
          next_obs (18,), next_state, reward (), terminated () (always False),
          info with `discount` ().
        """
        del key
        model = self.model_for(params)
        dtype = state.data.ctrl.dtype
        action = jnp.clip(jnp.asarray(action, dtype), -1.0, 1.0)
        obs = self.get_obs(state)
        data = state.data.replace(ctrl=action)
        x_before = data.qpos[0]
        # MuJoCo's C simulator resets mjData (qpos0, zero qvel, ctrl and warm
        # start) when qpos, qvel or qacc hold a NaN or a value beyond mjMAXVAL
        # (mj_checkPos/Vel/Acc) and steps on from there; gym's envs, the
        # paper's, inherit that. MJX does not check, so we do, per substep,
        # with the same test: before the step on qpos and qvel, as C does, and
        # after it on all three (C checks qacc before integrating; a bad one
        # here is reset without C's one substep of falling from rest).
        # Nothing changes unless a state is bad.
        reset_data = mjx.make_data(model).replace(qpos=jnp.asarray(self.mj_model.qpos0, dtype))

        def reset_if(bad, d):
            return jax.tree.map(lambda reset, x: jnp.where(bad, reset, x), reset_data, d)

        def substep(_, d):
            d = reset_if(_is_bad(d.qpos) | _is_bad(d.qvel), d)
            d = mjx.step(model, d)
            return reset_if(_is_bad(d.qpos) | _is_bad(d.qvel) | _is_bad(d.qacc), d)

        data = jax.lax.fori_loop(0, self.frame_skip, substep, data)
        next_state = EnvState(
            data=data,
            x_velocity=(data.qpos[0] - x_before) / self.dt,
            time=state.time + 1,
        )
        next_obs = self.get_obs(next_state)
        reward = self.reward(obs, action, next_obs)
        terminated = self.is_terminated(next_state, params)
        return next_obs, next_state, reward, terminated, {"discount": self.discount(next_state, params)}

    def reset_env(self, key, params):
        """Returns the initial obs (18,) and state of the agent `params`:
        qpos, qvel = the model's initial ones + N(0, 0.001^2) each."""
        model = self.model_for(params)
        key_qpos, key_qvel = jax.random.split(key)
        data = mjx.make_data(model)
        noise_qpos = RESET_NOISE_SCALE * jax.random.normal(key_qpos, data.qpos.shape, data.qpos.dtype)
        noise_qvel = RESET_NOISE_SCALE * jax.random.normal(key_qvel, data.qvel.shape, data.qvel.dtype)
        data = data.replace(
            qpos=jnp.asarray(self.mj_model.qpos0, data.qpos.dtype) + noise_qpos,
            qvel=data.qvel + noise_qvel,
        )
        # qpos, qvel (and the zero warm start) are all the next step reads: it
        # begins with its own forward pass. Kinematics alone fills the body
        # and geom poses for anyone reading `state.data`; a full mjx.forward
        # (collision, constraint solve) would change nothing downstream (it
        # does not touch the warm start, in MJX as in C) and makes reset
        # compile ~3x slower (10 s vs 3 s on 2 CPU cores); step inlines
        # reset for its auto-reset, so it would pay that too.
        data = mjx.kinematics(model, data)
        state = EnvState(data=data, x_velocity=jnp.zeros((), data.qpos.dtype), time=jnp.zeros((), jnp.int32))
        return self.get_obs(state), state

    def get_obs(self, state, params=None, key=None):
        """(18,) observation of `state`."""
        del params, key
        qpos, qvel = state.data.qpos, state.data.qvel
        return jnp.concatenate([state.x_velocity[None], qpos[1:], qvel])

    def is_terminated(self, state, params):
        """HalfCheetah never terminates early: () False."""
        del state, params
        return jnp.array(False)

    def state_from_obs(self, obs, params=None):
        """The state whose observation is obs (18,), for planning rollouts.

        Approximate, as the observation does not contain everything: qpos[0]
        (torso x, which no force or observation depends on) is set to 0,
        qpos[1:] = obs[1:9], qvel = obs[9:18], the finite-difference
        x-velocity = obs[0], time 0, and MuJoCo's solver warm start
        (`qacc_warmstart`) and all derived quantities are reset (recomputed by
        the step's forward pass), so a planned step can differ from the real
        one by the constraint solver's tolerance. `params`: the agent's
        `EnvParams` (leaves of shape ()), or None for the default agent.
        """
        obs = jnp.asarray(obs)
        model = self.model_for(params) if params is not None else self.mjx_model
        data = mjx.make_data(model)
        dtype = data.qpos.dtype
        obs = obs.astype(dtype)
        data = data.replace(qpos=jnp.concatenate([jnp.zeros((1,), dtype), obs[1:9]]),
                            qvel=obs[9:18])
        return EnvState(data=data, x_velocity=obs[0], time=jnp.zeros((), jnp.int32))

    # -- known reward and termination -----------------------------------------

    def reward(self, obs, action, next_obs):
        """(...) forward velocity minus control cost of obs (..., 18)
        --action (..., 6)--> next_obs (..., 18)."""
        del obs
        return next_obs[..., 0] - self.ctrl_cost_weight * jnp.sum(jnp.square(action), axis=-1)

    def terminated(self, next_obs):
        """(...) all False for next_obs (..., 18): no early termination."""
        return jnp.zeros(jnp.shape(next_obs)[:-1], bool)

    # -- spaces ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return "halfcheetah"

    @property
    def num_actions(self) -> int:
        return self.action_dim

    def action_space(self, params=None) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (self.action_dim,), jnp.float32)

    def observation_space(self, params=None) -> spaces.Box:
        return spaces.Box(-jnp.inf, jnp.inf, (self.obs_dim,), jnp.float32)
