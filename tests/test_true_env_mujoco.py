"""HalfCheetah's true dynamics on MuJoCo's C simulator (`mujoco.rollout` behind
`jax.pure_callback`): the same step as a hand-written `mujoco.mj_step` loop
and as MJX, under jit and vmap over agents, and inside True env + MPC's
planner. One MJX compilation for the whole file (MJX compiles slowly on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

import envs
from persim_jax import dynamics, methods, planning
from persim_jax.mujoco_physics import mujoco_dynamics

NUM_STATES = 6


def c_reference_step(env, covariates, obs, action):
    """(B, 18) next observations by `mujoco.mj_step` itself, one state at a
    time: the env step `state_from_obs` / `step_env` describe (torso x 0,
    zero warm start, the clipped action held for frame_skip substeps)."""
    model = env.c_model_for(*[float(c) for c in covariates])
    data = mujoco.MjData(model)
    next_obs = []
    for o, a in zip(np.asarray(obs, np.float64), np.asarray(action, np.float64)):
        mujoco.mj_resetData(model, data)
        data.qpos[:] = np.concatenate([[0.0], o[1:9]])
        data.qvel[:] = o[9:18]
        data.ctrl[:] = np.clip(a, -1.0, 1.0)
        for _ in range(env.frame_skip):
            mujoco.mj_step(model, data)
        next_obs.append(np.concatenate([[data.qpos[0] / env.dt], data.qpos[1:], data.qvel]))
    return np.asarray(next_obs, np.float32)


@pytest.fixture(scope="module")
def env():
    return envs.make("halfcheetah")


@pytest.fixture(scope="module")
def cases(env):
    """Two agents far apart ((0.3, 1.7), (1.7, 0.3)), each with NUM_STATES
    running states (20 C steps of random actions from the reset pose) and
    actions partly outside [-1, 1] (the step clips them)."""
    rng = np.random.default_rng(0)
    covariates = np.asarray(env.test_agents[:2], np.float32)
    obs = np.zeros((2, NUM_STATES, env.obs_dim), np.float32)
    for agent, c in enumerate(covariates):
        for i in range(NUM_STATES):
            o = np.zeros(env.obs_dim, np.float32)
            o[1:] = 0.01 * rng.standard_normal(env.obs_dim - 1)
            for _ in range(20):
                o = c_reference_step(env, c, o[None], rng.uniform(-1, 1, (1, 6)))[0]
            obs[agent, i] = o
    action = rng.uniform(-1.3, 1.3, (2, NUM_STATES, env.action_dim)).astype(np.float32)
    return jnp.asarray(covariates), jnp.asarray(obs), jnp.asarray(action)


@pytest.fixture(scope="module")
def mjx_step(env):
    """Agents (K, P), obs (K, B, 18), actions (K, B, 6) -> (K, B, 18) by MJX:
    one compiled single-agent step (the agent's params are its arguments;
    vmapping the MJX model over agents compiles ~30 % slower), called per
    agent."""
    step = jax.jit(lambda c, obs, action: dynamics.env_dynamics(
        env, env.covariates_to_params(c))(obs, action)[0])
    return lambda covariates, obs, action: np.stack(
        [step(c, o, a) for c, o, a in zip(covariates, obs, action)])


@pytest.fixture(scope="module")
def c_step(env):
    """The same as `mjx_step` by `mujoco_dynamics`, jitted and vmapped over
    the agents (one host call for all K · B rows)."""
    return jax.jit(jax.vmap(lambda c, obs, action: mujoco_dynamics(env, c)(obs, action)[0]))


def test_equals_the_c_simulator_stepped_by_hand(env, cases, c_step):
    covariates, obs, action = cases
    got = np.asarray(c_step(covariates, obs, action))
    assert got.shape == (2, NUM_STATES, env.obs_dim) and got.dtype == np.float32
    for agent in range(2):
        expected = c_reference_step(env, covariates[agent], obs[agent], action[agent])
        # The same float64 C computation, rounded to float32 once.
        np.testing.assert_array_equal(got[agent], expected)
    # The per-member form (1, B, D) and an unbatched call are the same step.
    one = jax.jit(mujoco_dynamics(env, covariates[1]))
    np.testing.assert_array_equal(np.asarray(one(obs[1][None], action[1]))[0], got[1])


def test_equals_mjx_one_step_for_two_agents(env, cases, c_step, mjx_step):
    covariates, obs, action = cases
    got = np.asarray(c_step(covariates, obs, action))
    expected = np.asarray(mjx_step(covariates, obs, action))
    # MJX steps in float32 (rounding 6e-8 relative per operation, through 5
    # substeps of contact solves: ~1e-5 of the velocities, which reach ~20);
    # C in float64. 1e-3 allows the rare stiff contact solved in float32
    # (envs/halfcheetah.py) and is still far below what a wrong agent, frame
    # skip or clipping changes (checked below).
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    swapped = np.asarray(c_step(covariates[::-1], obs, action))
    assert np.abs(swapped - expected).max() > 0.1


def test_returns_of_action_sequences_equal_mjx(env, cases, c_step, mjx_step):
    covariates, obs, _ = cases
    horizon = 5
    sequences = np.random.default_rng(1).uniform(-1.0, 1.0, (horizon, 2, NUM_STATES, 6))
    reward = jax.jit(env.reward)

    def returns(step):
        state, total = obs, np.zeros((2, NUM_STATES))
        for action in sequences.astype(np.float32):     # reuses the one compiled step
            next_state = step(covariates, state, action)
            total = total + np.asarray(reward(state, action, next_state))
            state = next_state
        return total, np.asarray(state)

    c_returns, c_final = returns(c_step)
    mjx_returns, mjx_final = returns(mjx_step)
    # Five steps of a chaotic gait amplify the one-step float32 gaps; the
    # returns (sums of velocities ~1-10) still agree to a few 1e-3.
    np.testing.assert_allclose(c_returns, mjx_returns, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(c_final, mjx_final, rtol=1e-2, atol=1e-2)


def test_physics_choice(env):
    assert jax.default_backend() == "cpu"
    assert methods.TrueEnvMPC(env).dynamics_for_agent(None, [0]).physics == "mujoco"
    assert methods.TrueEnvMPC(env, "mjx").dynamics_for_agent(None, [0]).physics == "mjx"
    cartpole = envs.make("cartpole")
    assert dynamics.true_env_dynamics_for_agent(cartpole).physics == "mjx"
    with pytest.raises(ValueError, match="physics"):
        dynamics.true_env_dynamics_for_agent(cartpole, "mujoco")
    with pytest.raises(ValueError, match="physics"):
        methods.TrueEnvMPC(env, "bullet")


def test_true_env_mpc_plans_on_it(env, cases):
    covariates, obs, _ = cases
    config = planning.planner_config(env, num_samples=8, horizon=3, num_elites=3, num_rounds=1)
    planner = planning.make_planner(config, env)
    for_agent = methods.TrueEnvMPC(env).dynamics_for_agent(None, [0, 1])

    @jax.jit
    def plan(key, obs):
        def one(row, covariates, obs):
            action, _ = planner.plan(key, planner.init(), obs, for_agent(row, covariates))
            return action
        return jax.vmap(one)(jnp.arange(2), covariates, obs)

    start = jnp.broadcast_to(obs[0, 0], (2, env.obs_dim))     # both agents from one state
    action = np.asarray(plan(jax.random.PRNGKey(0), start))
    assert action.shape == (2, env.action_dim)
    assert np.all(np.isfinite(action)) and np.all(np.abs(action) <= 1.0)
    # A pure function of its inputs: the same key plans the same again; the
    # same key and start but another agent's physics plans otherwise.
    np.testing.assert_array_equal(np.asarray(plan(jax.random.PRNGKey(0), start)), action)
    assert not np.array_equal(action[0], action[1])
