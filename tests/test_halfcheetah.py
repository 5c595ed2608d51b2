"""HalfCheetah on MJX against MuJoCo's C simulator, and its env contract.

Compiling an MJX step takes ~10-20 s on 2 CPU cores, so every compiled
function is shared: one single-agent `env.step`/`env.reset` per precision
(the base class jits them) and one 500-agent vmapped reset and step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

import envs
from envs.halfcheetah import HalfCheetah

# The four corners of the paper's range and the default agent.
REFERENCE_AGENTS = ((0.2, 0.2), (0.2, 1.8), (1.8, 0.2), (1.8, 1.8), (1.0, 1.0))
NUM_REFERENCE_STEPS = 100
NUM_BATCH_AGENTS = 500
# gym's masses after settotalmass=14 (docs/authors-code.md 1.3) and dof dampings.
GYM_BODY_MASS = np.array([0.0, 6.2502, 1.5435, 1.5874, 1.0954, 1.4381, 1.2008, 0.8845])
GYM_DOF_DAMPING = np.array([0.0, 0.0, 0.0, 6.0, 4.5, 3.0, 4.5, 3.0, 1.5])


def _c_env_step(model: mujoco.MjModel, data: mujoco.MjData, action: np.ndarray) -> np.ndarray:
    """One env step (5 mj_step) of the C simulator; returns the (18,) obs."""
    data.ctrl[:] = action
    x_before = data.qpos[0]
    for _ in range(5):
        mujoco.mj_step(model, data)
    return np.concatenate([[(data.qpos[0] - x_before) / 0.05], data.qpos[1:], data.qvel])


def _reference_run(env: HalfCheetah | None = None) -> dict[str, np.ndarray]:
    """Steps each reference agent 100 times in MJX and in C.

    Returns (A, T, 18) arrays: `mjx` the free-running MJX observations;
    `c_resynced` the C simulator's observation after one env step from MJX's
    state before that step (qpos, qvel and the solver's warm start); and
    `c_free` the free-running C observations from MJX's reset state.
    """
    # Without `env`, a float64 one is built: its MJX model must be put in x64.
    x64 = env is None
    with jax.enable_x64(x64):
        env = HalfCheetah() if x64 else env
        # Float32-representable actions so that MJX and C apply the same ctrl.
        actions = np.random.default_rng(0).uniform(-1, 1, (NUM_REFERENCE_STEPS, 6)).astype(np.float32)
        out = {"mjx": [], "c_resynced": [], "c_free": []}
        for index, agent in enumerate(REFERENCE_AGENTS):
            params = env.agent_params(np.asarray(agent))
            _, state = env.reset(jax.random.key(index), params)
            c_model = env.c_model_for(*agent)
            c_free = mujoco.MjData(c_model)
            c_free.qpos[:] = np.asarray(state.data.qpos)
            c_free.qvel[:] = np.asarray(state.data.qvel)
            mujoco.mj_forward(c_model, c_free)
            c_resynced = mujoco.MjData(c_model)
            mjx_obs, resynced_obs, free_obs = [], [], []
            for action in actions:
                c_resynced.qpos[:] = np.asarray(state.data.qpos)
                c_resynced.qvel[:] = np.asarray(state.data.qvel)
                c_resynced.qacc_warmstart[:] = np.asarray(state.data.qacc_warmstart)
                obs, state, _, done, _ = env.step(
                    jax.random.key(0), state, jnp.asarray(action, state.data.qpos.dtype), params)
                assert not bool(done)
                mjx_obs.append(np.asarray(obs, np.float64))
                resynced_obs.append(_c_env_step(c_model, c_resynced, action))
                free_obs.append(_c_env_step(c_model, c_free, action))
            out["mjx"].append(mjx_obs)
            out["c_resynced"].append(resynced_obs)
            out["c_free"].append(free_obs)
    return {name: np.asarray(value) for name, value in out.items()}


def _relative_error(obs: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(..., T) max over the 18 dims of |obs - reference| / (1 + |reference|)."""
    return np.max(np.abs(obs - reference) / (1.0 + np.abs(reference)), axis=-1)


@pytest.fixture(scope="module")
def env():
    """The float32 env; sharing it shares the compiled `step` and `reset`."""
    return HalfCheetah()


@pytest.fixture(scope="module")
def reference_x64():
    return _reference_run()


@pytest.fixture(scope="module")
def reference_float32(env):
    return _reference_run(env)


# Why these tolerances. Errors are max over the 18 dims of
# |MJX - C| / (1 + |C|) (velocities reach 50 rad/s); measured on this test's
# actions and, for the tails, over 6 action seeds x 5 agents x 100 steps.
#
# - A random-action cheetah is chaotic: perturbing the C simulator's initial
#   qpos by 1e-12 grows to 1e-8 within 10 env steps and to O(1) within 50-100
#   steps. MJX's float64 round-off (1e-14) therefore cannot stay close to C
#   over a whole 100-step trajectory (here: 1e-11 after 20 steps, 1e-6 after
#   50, 1.4 after 100); the free-running comparison is bounded to the first
#   20 steps (1 s), where MJX-x64 stayed within 5e-8 of C for every seed.
# - Every one of the 100 steps is instead checked from the same state: C is
#   stepped from MJX's state (qpos, qvel and the solver's warm start) and
#   compared with MJX's next observation. That also checks the state MJX
#   carries from step to step.
#   - x64: the median error is 1e-14 and the worst here 5e-13. Rarely (a few
#     steps in 3000) the Newton solver's stopping test (tolerance 1e-8) falls on a
#     different iteration in MJX and C, and the step differs by up to 2e-7
#     (1e-5 was seen on a single substep). Hence: >= 98% of steps within
#     1e-10 and all within 1e-4.
#   - float32: MJX's float32 round-off (6e-8 relative) over 5 substeps is
#     amplified by stiff contacts and joint limits, solved in float32 far
#     above the solver's 1e-8 tolerance: the median error is 1e-6, 98% of
#     steps are within 6e-5, the worst here is 1.9e-3 (3.6e-3 seen with
#     smooth sinusoidal actions). Hence: >= 98% within 3e-4 and all within
#     1e-2. Free-running float32 is 1e-5..5e-2 away from C after 20 steps and
#     O(1) after 50, so it is compared per step only.
X64_TYPICAL_TOL, X64_WORST_TOL = 1e-10, 1e-4
FLOAT32_TYPICAL_TOL, FLOAT32_WORST_TOL = 3e-4, 1e-2
FREE_RUNNING_STEPS, FREE_RUNNING_TOL = 20, 1e-6


@pytest.mark.parametrize("agent_index", range(len(REFERENCE_AGENTS)))
def test_every_step_matches_c_simulator_x64(reference_x64, agent_index):
    error = _relative_error(reference_x64["mjx"][agent_index], reference_x64["c_resynced"][agent_index])
    assert error.shape == (NUM_REFERENCE_STEPS,)
    assert np.mean(error <= X64_TYPICAL_TOL) >= 0.98, np.sort(error)[-5:]
    assert error.max() <= X64_WORST_TOL, (error.argmax(), error.max())


@pytest.mark.parametrize("agent_index", range(len(REFERENCE_AGENTS)))
def test_every_step_matches_c_simulator_float32(reference_float32, agent_index):
    error = _relative_error(reference_float32["mjx"][agent_index],
                            reference_float32["c_resynced"][agent_index])
    assert np.mean(error <= FLOAT32_TYPICAL_TOL) >= 0.98, np.sort(error)[-5:]
    assert error.max() <= FLOAT32_WORST_TOL, (error.argmax(), error.max())


@pytest.mark.parametrize("agent_index", range(len(REFERENCE_AGENTS)))
def test_free_running_trajectory_matches_c_simulator_x64(reference_x64, agent_index):
    error = _relative_error(reference_x64["mjx"][agent_index, :FREE_RUNNING_STEPS],
                            reference_x64["c_free"][agent_index, :FREE_RUNNING_STEPS])
    assert error.max() <= FREE_RUNNING_TOL, (error.argmax(), error.max())


def test_reference_agents_differ(reference_x64):
    """The scales change the physics: the corners' trajectories differ."""
    obs = reference_x64["mjx"][:, :FREE_RUNNING_STEPS]
    for i in range(len(REFERENCE_AGENTS)):
        for j in range(i):
            assert np.abs(obs[i] - obs[j]).max() > 0.1, (REFERENCE_AGENTS[i], REFERENCE_AGENTS[j])


# -- env contract (float32, the default) --------------------------------------


@pytest.fixture(scope="module")
def stepped(env):
    """One agent's reset state, an action and the resulting step."""
    params = env.agent_params(np.array([0.7, 1.3]))
    obs, state = env.reset(jax.random.key(3), params)
    # Take the cheetah off its rest pose so that velocities are not tiny.
    for action in np.random.default_rng(1).uniform(-1, 1, (5, 6)):
        obs, state, *_ = env.step(jax.random.key(0), state, jnp.asarray(action, jnp.float32), params)
    action = jnp.array([0.9, -0.4, 0.2, -1.0, 0.6, 0.1], jnp.float32)
    step = env.step(jax.random.key(0), state, action, params)
    return params, obs, state, action, step


def test_attributes_and_spaces(env):
    assert isinstance(envs.make("halfcheetah"), HalfCheetah)
    assert env.name == "halfcheetah"
    assert (env.obs_dim, env.action_dim, env.num_actions) == (18, 6, 6)
    assert env.max_episode_steps == 1000 and not env.discrete_actions
    assert env.dt == pytest.approx(0.05)
    assert env.covariate_names == ("mass_scale", "damping_scale")
    space = env.action_space(env.default_params)
    assert space.shape == (6,)
    np.testing.assert_array_equal(space.low, -1.0)
    np.testing.assert_array_equal(space.high, 1.0)
    assert env.observation_space(env.default_params).shape == (18,)
    np.testing.assert_array_equal(env.test_agents[-1], [1.0, 1.0])


def test_model_scaling(env):
    """Every body's mass and every dof's damping are scaled; inertia is not."""
    np.testing.assert_allclose(env.mj_model.body_mass, GYM_BODY_MASS, atol=1e-4)
    np.testing.assert_allclose(env.mj_model.dof_damping, GYM_DOF_DAMPING)
    c_model = env.c_model_for(1.8, 0.3)
    np.testing.assert_allclose(c_model.body_mass, 1.8 * env.mj_model.body_mass)
    np.testing.assert_allclose(c_model.dof_damping, 0.3 * GYM_DOF_DAMPING)
    np.testing.assert_array_equal(c_model.body_inertia, env.mj_model.body_inertia)
    # The copy is independent of the default model.
    np.testing.assert_allclose(env.mj_model.body_mass, GYM_BODY_MASS, atol=1e-4)
    model = env.model_for(env.agent_params(np.array([1.8, 0.3])))
    np.testing.assert_allclose(model.body_mass, c_model.body_mass, rtol=1e-6)
    np.testing.assert_allclose(model.dof_damping, c_model.dof_damping, rtol=1e-6)
    np.testing.assert_array_equal(model.body_inertia, env.mjx_model.body_inertia)
    batched = env.model_for(env.agent_params(env.test_agents))
    assert batched.body_mass.shape == (5, 8) and batched.dof_damping.shape == (5, 9)
    np.testing.assert_allclose(batched.body_mass[1], 1.7 * env.mj_model.body_mass, rtol=1e-6)
    np.testing.assert_allclose(batched.dof_damping[1], 0.3 * GYM_DOF_DAMPING, rtol=1e-6)


def test_observation_layout_and_finite_difference(env, stepped):
    _, _, state, _, (next_obs, next_state, _, done, info) = stepped
    assert next_obs.shape == (18,) and next_obs.dtype == jnp.float32
    assert not bool(done) and not bool(info["terminated"]) and not bool(info["truncated"])
    qpos, qvel = np.asarray(next_state.data.qpos), np.asarray(next_state.data.qvel)
    np.testing.assert_array_equal(next_obs[1:9], qpos[1:])
    np.testing.assert_array_equal(next_obs[9:], qvel)
    # obs[0] is the finite-difference rootx velocity over the 5 substeps, not qvel[0].
    x_velocity = (qpos[0] - float(state.data.qpos[0])) / 0.05
    np.testing.assert_allclose(next_obs[0], x_velocity, rtol=1e-4, atol=1e-5)
    assert abs(float(next_obs[0]) - float(qvel[0])) > 1e-3
    assert int(next_state.time) == int(state.time) + 1


def test_reward_of_the_step(env, stepped):
    _, obs, _, action, (next_obs, _, reward, _, _) = stepped
    expected = float(next_obs[0]) - 0.1 * float(np.sum(np.square(action)))
    np.testing.assert_allclose(reward, expected, rtol=1e-6, atol=1e-6)
    # Same function, compiled inside the step or run eagerly here.
    np.testing.assert_allclose(reward, env.reward(obs, action, next_obs), rtol=1e-6)


def test_action_clipping(env, stepped):
    params, _, state, action, _ = stepped
    # Scaling by 3 pushes the entries with |a| > 1/3 out of the box.
    wild = 3 * action
    assert bool(jnp.any(jnp.abs(wild) > 1)) and bool(jnp.any(jnp.abs(wild) < 1))
    clipped = jnp.clip(wild, -1, 1)
    wild_obs, wild_state, wild_reward, _, _ = env.step(jax.random.key(0), state, wild, params)
    obs, next_state, reward, _, _ = env.step(jax.random.key(0), state, clipped, params)
    np.testing.assert_array_equal(wild_obs, obs)
    np.testing.assert_array_equal(wild_state.data.qpos, next_state.data.qpos)
    np.testing.assert_array_equal(wild_state.data.ctrl, clipped)
    # The applied (clipped) action is the one charged.
    np.testing.assert_array_equal(wild_reward, reward)
    np.testing.assert_allclose(reward, obs[0] - 0.1 * jnp.sum(clipped ** 2), rtol=1e-6)


@pytest.mark.parametrize("field, index, value", [("qvel", 3, 1e11), ("qpos", 2, float("nan"))])
def test_an_unstable_state_is_reset_as_the_c_simulator_does(env, stepped, field, index, value):
    # C MuJoCo resets mjData (qpos0, zero qvel and ctrl) when a qpos/qvel/qacc
    # entry is NaN or beyond mjMAXVAL, and steps on from there (gym's envs
    # inherit it); the MJX env emulates that, so one step from a bad state is
    # C's five substeps from rest.
    params, _, state, action, _ = stepped
    bad = np.asarray(getattr(state.data, field)).copy()
    bad[index] = value
    state = state.replace(data=state.data.replace(**{field: jnp.asarray(bad)}))
    obs, next_state, reward, _, _ = env.step(jax.random.key(0), state, action, params)

    c_model = env.c_model_for(0.7, 1.3)
    c_data = mujoco.MjData(c_model)
    c_data.qpos[:], c_data.qvel[:] = np.asarray(state.data.qpos), np.asarray(state.data.qvel)
    c_data.ctrl[:] = np.asarray(action)
    mujoco.mj_step(c_model, c_data, nstep=5)
    warning = {"qpos": mujoco.mjtWarning.mjWARN_BADQPOS, "qvel": mujoco.mjtWarning.mjWARN_BADQVEL}
    assert c_data.warning[warning[field]].number == 1
    assert np.all(np.isfinite(np.asarray(obs))) and np.isfinite(float(reward))
    np.testing.assert_allclose(next_state.data.qpos[1:], c_data.qpos[1:], atol=1e-5)
    np.testing.assert_allclose(next_state.data.qvel, c_data.qvel, atol=1e-4)
    np.testing.assert_allclose(next_state.data.ctrl, 0.0)


def test_reward_and_termination_functions_broadcast():
    env_default, env_paper = HalfCheetah(), envs.make("halfcheetah", ctrl_cost_weight=0.05)
    key_obs, key_action, key_next = jax.random.split(jax.random.key(0), 3)
    obs = jax.random.normal(key_obs, (3, 4, 18))
    action = jax.random.uniform(key_action, (3, 4, 6), minval=-1, maxval=1)
    next_obs = jax.random.normal(key_next, (3, 4, 18))
    ctrl = np.sum(np.square(np.asarray(action)), axis=-1)
    for env_, weight in ((env_default, 0.1), (env_paper, 0.05)):
        reward = env_.reward(obs, action, next_obs)
        assert reward.shape == (3, 4)
        np.testing.assert_allclose(reward, np.asarray(next_obs)[..., 0] - weight * ctrl, rtol=1e-6, atol=1e-6)
    # The reward reads next_obs, not obs (the authors' early off-by-one).
    np.testing.assert_array_equal(env_default.reward(next_obs, action, next_obs),
                                  env_default.reward(obs, action, next_obs))
    terminated = env_default.terminated(next_obs)
    assert terminated.shape == (3, 4) and terminated.dtype == jnp.bool_ and not terminated.any()


def test_truncation_after_1000_steps(env, stepped):
    params, _, state, action, (next_obs, _, _, _, _) = stepped
    obs, state_998, _, done, info = env.step(jax.random.key(0), state.replace(time=jnp.int32(998)), action, params)
    assert int(state_998.time) == 999 and not bool(done) and not bool(info["truncated"])
    obs, reset_state, _, done, info = env.step(jax.random.key(0), state.replace(time=jnp.int32(999)), action, params)
    assert bool(done) and bool(info["truncated"]) and not bool(info["terminated"])
    # The physics of the last step is unaffected; the returned obs is a reset one.
    np.testing.assert_array_equal(info["final_observation"], next_obs)
    assert int(reset_state.time) == 0 and float(obs[0]) == 0.0
    assert np.abs(np.asarray(obs[1:])).max() < 0.01


# -- 500 heterogeneous agents ---------------------------------------------------


@pytest.fixture(scope="module")
def batch(env):
    """500 sampled agents (the 5 test agents first), reset in one vmapped call."""
    covariates = env.sample_agents(jax.random.key(11), NUM_BATCH_AGENTS)
    params = env.agent_params(covariates)
    keys = jax.random.split(jax.random.key(12), NUM_BATCH_AGENTS)
    obs, state = jax.jit(jax.vmap(env.reset))(keys, params)
    return covariates, params, obs, state


@pytest.fixture(scope="module")
def batched_step(env):
    """`env.step` vmapped over agents, compiled once for the 500-agent batch."""
    return jax.jit(jax.vmap(env.step))


def test_reset_noise(env, batch):
    _, _, obs, state = batch
    np.testing.assert_array_equal(obs[:, 0], 0.0)
    qpos, qvel = np.asarray(state.data.qpos), np.asarray(state.data.qvel)
    np.testing.assert_array_equal(obs[:, 1:9], qpos[:, 1:])
    np.testing.assert_array_equal(obs[:, 9:], qvel)
    for name, noise in (("qpos", qpos - env.mj_model.qpos0), ("qvel", qvel)):
        # 4500 samples: the std estimate is within 5% with overwhelming probability.
        assert np.std(noise) == pytest.approx(0.001, rel=0.05), name
        assert abs(np.mean(noise)) < 5 * 0.001 / np.sqrt(noise.size), name
        # Every agent draws its own noise.
        assert np.unique(noise, axis=0).shape[0] == NUM_BATCH_AGENTS, name
    np.testing.assert_array_equal(np.asarray(state.time), 0)


def test_batched_step_equals_single_agent_steps(env, batch, batched_step):
    covariates, params, obs, state = batch
    actions = jax.random.uniform(jax.random.key(13), (NUM_BATCH_AGENTS, 6), minval=-1, maxval=1)
    keys = jax.random.split(jax.random.key(14), NUM_BATCH_AGENTS)
    batched = batched_step(keys, state, actions, params)
    batched_obs, batched_reward = np.asarray(batched[0]), np.asarray(batched[2])
    assert batched_obs.shape == (NUM_BATCH_AGENTS, 18) and batched_reward.shape == (NUM_BATCH_AGENTS,)

    # Agents alone, through the unbatched jitted `env.step` of the other tests:
    # 10 spread over the batch. Sliced on the device: a NumPy copy would drop
    # the weak type of `params.max_steps_in_episode` (a weakly typed int32),
    # a new signature for the jitted step, which would compile again.
    checked = np.linspace(0, NUM_BATCH_AGENTS - 1, 10).astype(int)
    single_obs, single_reward = [], []
    for i in checked:
        state_i, action_i, params_i = jax.tree.map(lambda leaf: leaf[i], (state, actions, params))
        obs_i, _, reward_i, _, _ = env.step(keys[i], state_i, action_i, params_i)
        single_obs.append(np.asarray(obs_i))
        single_reward.append(np.asarray(reward_i))
    single_obs, single_reward = np.stack(single_obs), np.stack(single_reward)
    # vmap may reorder float32 operations; the per-agent results agree to round-off.
    np.testing.assert_allclose(batched_obs[checked], single_obs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batched_reward[checked], single_reward, rtol=1e-4, atol=1e-4)
    # The agents really differ: same action, different physics.
    same_action = jnp.broadcast_to(actions[0], actions.shape)
    spread = batched_step(keys, state, same_action, params)[0]
    assert np.std(np.asarray(spread)[:, 9:], axis=0).max() > 0.1


def test_state_rebuilt_from_obs_steps_like_the_real_state(env, batch, batched_step):
    # The observation lacks the torso x (irrelevant) and MuJoCo's solver warm
    # start (reset by `env.state_from_obs`, which True env + MPC plans from):
    # one step from the rebuilt state must still match the real one to solver
    # tolerance. The batched step of the test above serves all three calls.
    _, params, _, state = batch
    keys = jax.random.split(jax.random.key(15), NUM_BATCH_AGENTS)
    state = state.replace(data=state.data.replace(
        qvel=jax.random.normal(jax.random.key(16), (NUM_BATCH_AGENTS, 9))))
    first, second = jax.random.uniform(jax.random.key(17), (2, NUM_BATCH_AGENTS, 6),
                                       minval=-1, maxval=1)
    obs, state, _, _, _ = batched_step(keys, state, first, params)
    assert np.abs(np.asarray(state.data.qacc_warmstart)).max() > 1.0   # a real warm start
    expected = batched_step(keys, state, second, params)[0]
    rebuilt = jax.jit(jax.vmap(env.state_from_obs))(obs, params)
    np.testing.assert_array_equal(np.asarray(jax.vmap(env.get_obs)(rebuilt)), np.asarray(obs))
    got = batched_step(keys, rebuilt, second, params)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-3)


# -- validation -----------------------------------------------------------------


@pytest.mark.parametrize("covariates, name", [
    ([2.0, 1.0], "mass_scale"),
    ([1.0, 0.1], "damping_scale"),
    ([float("nan"), 1.0], "mass_scale"),
    ([1.0, float("inf")], "damping_scale"),
    ([[1.0, 1.0], [1.0, 1.9]], "damping_scale"),
    ([1.0], "mass_scale"),
    ([1.0, 1.0, 1.0], "damping_scale"),
])
def test_invalid_covariates_raise(env, covariates, name):
    with pytest.raises(ValueError, match=name):
        env.agent_params(covariates)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_invalid_ctrl_cost_weight_raises(weight):
    with pytest.raises(ValueError, match="ctrl_cost_weight"):
        envs.make("halfcheetah", ctrl_cost_weight=weight)
