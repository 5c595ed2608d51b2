"""MountainCar and CartPole against gymnasium's implementations.

Each test episode is played by a JAX policy inside one jitted `lax.scan` of
our env; gymnasium's env, given the same modified physical parameters and the
same initial state, then replays the recorded actions. Whole episodes are
compared in float64 (`jax.enable_x64`) because CartPole is open-loop unstable:
replaying fixed actions amplifies float32 rounding by e^(t·sqrt(g/l)), so a
float32 episode would diverge from gymnasium's float64 one for reasons of
precision, not physics. The float32 default path is checked one step at a
time from states copied into gymnasium.
"""

from __future__ import annotations

import functools

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs

TOL = 1e-4

MOUNTAINCAR_AGENTS = [(0.0001,), (0.0005,), (0.001,), (0.0025,), (0.0035,), (0.00173,)]
CARTPOLE_AGENTS = [(2.0, 0.15), (2.0, 0.85), (18.0, 0.15), (18.0, 0.85), (10.0, 0.5), (6.3, 0.41)]


def _mountaincar_policy(key, obs):
    # Pump energy (push along the velocity) with 20 % random actions, so that
    # episodes end both at the goal and at the 500-step cap.
    greedy = jnp.where(obs[1] >= 0, 2, 0)
    explore = jax.random.bernoulli(key, 0.2)
    return jnp.where(explore, jax.random.randint(key, (), 0, 3), greedy)


def _cartpole_policy(key, obs):
    # A linear balancing rule with 10 % random actions: long episodes that
    # still end by failure now and then.
    greedy = (obs[2] + 0.3 * obs[3] + 0.01 * obs[0] + 0.1 * obs[1] > 0).astype(jnp.int32)
    explore = jax.random.bernoulli(key, 0.1)
    return jnp.where(explore, jax.random.randint(key, (), 0, 2), greedy)


POLICIES = {"mountaincar": _mountaincar_policy, "cartpole": _cartpole_policy}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _play_episode(env, policy, key, params):
    """One episode of `env` under `policy`, as arrays over the step cap:
    returns obs0 (D,), actions (T,), next_obs (T, D), rewards (T,),
    terminated (T,), truncated (T,), done (T,)."""
    reset_key, key = jax.random.split(key)
    obs0, state = env.reset(reset_key, params)

    def one_step(carry, step_key):
        obs, state, finished = carry
        policy_key, env_key = jax.random.split(step_key)
        action = policy(policy_key, obs)
        obs_next, state, reward, done, info = env.step(env_key, state, action, params)
        out = (action, info["final_observation"], reward, info["terminated"],
               info["truncated"], done, finished)
        return (obs_next, state, finished | done), out

    keys = jax.random.split(key, env.max_episode_steps)
    _, out = jax.lax.scan(one_step, (obs0, state, jnp.array(False)), keys)
    actions, next_obs, rewards, terminated, truncated, done, finished_before = out
    return obs0, actions, next_obs, rewards, terminated, truncated, done, finished_before


def _gymnasium_env(name, covariates):
    if name == "mountaincar":
        env = gymnasium.make("MountainCar-v0").unwrapped
        env.gravity = float(covariates[0])
    else:
        env = gymnasium.make("CartPole-v1").unwrapped
        env.force_mag = float(covariates[0])
        env.length = float(covariates[1])
        env.polemass_length = env.masspole * env.length
    env.reset(seed=0)
    return env


def _set_gymnasium_state(env, name, obs):
    obs = np.asarray(obs, dtype=np.float64)
    env.state = tuple(obs) if name == "mountaincar" else obs.copy()
    if name == "cartpole":
        env.steps_beyond_terminated = None


@pytest.mark.parametrize(
    "name,covariates",
    [("mountaincar", c) for c in MOUNTAINCAR_AGENTS] + [("cartpole", c) for c in CARTPOLE_AGENTS])
def test_whole_episodes_match_gymnasium(name, covariates):
    env = envs.make(name)
    gym_env = _gymnasium_env(name, covariates)
    lengths, ends = [], []
    with jax.enable_x64(True):
        params = env.agent_params(np.asarray(covariates))
        assert params.gravity.dtype == jnp.float64
        for episode in range(3):
            out = _play_episode(env, POLICIES[name], jax.random.PRNGKey(episode), params)
            obs0, actions, next_obs, rewards, terminated, truncated, done, finished_before = (
                np.asarray(x) for x in out)
            length = int(np.argmax(done)) + 1
            assert done.any() and not finished_before[:length].any()
            _set_gymnasium_state(gym_env, name, obs0)
            for t in range(length):
                gym_obs, _, gym_terminated, _, _ = gym_env.step(int(actions[t]))
                # gymnasium rounds observations to float32: compare its state.
                np.testing.assert_allclose(next_obs[t], np.asarray(gym_env.state, np.float64),
                                           atol=TOL, rtol=0, err_msg=f"{name} {covariates} step {t}")
                assert bool(terminated[t]) == gym_terminated, f"step {t}"
            if name == "mountaincar":
                # Paper: -1 per step, 0 on the step that reaches the goal.
                expected = np.where(terminated[:length], 0.0, -1.0)
            else:
                expected = np.ones(length)
            np.testing.assert_array_equal(rewards[:length], expected)
            # Episodes end by termination or at the paper's cap, nothing else.
            assert terminated[length - 1] or length == env.max_episode_steps
            assert truncated[length - 1] == (length == env.max_episode_steps)
            lengths.append(length)
            ends.append(bool(terminated[length - 1]))
    assert max(lengths) > 40, f"episodes too short to test the physics: {lengths}"


def _trajectory_states(name, covariates, num_states=64):
    """Float32 states visited by our env under the test policy."""
    env = envs.make(name)
    params = env.agent_params(np.asarray(covariates))
    out = _play_episode(env, POLICIES[name], jax.random.PRNGKey(7), params)
    obs0, actions, next_obs = out[0], out[1], out[2]
    length = int(np.argmax(np.asarray(out[6]))) + 1
    states = np.concatenate([np.asarray(obs0)[None], np.asarray(next_obs)[:length - 1]])
    return env, params, states[:num_states], np.asarray(actions)[:num_states]


@pytest.mark.parametrize("name,covariates", [("mountaincar", (0.0035,)), ("mountaincar", (0.0001,)),
                                             ("cartpole", (18.0, 0.15)), ("cartpole", (2.0, 0.85))])
def test_float32_single_steps_match_gymnasium(name, covariates):
    env, params, states, actions = _trajectory_states(name, covariates)
    assert states.dtype == np.float32
    gym_env = _gymnasium_env(name, covariates)
    step = jax.jit(env.step_env)
    for obs, action in zip(states, actions):
        state = _state_from_obs(name, obs)
        next_obs, _, _, _, _ = step(jax.random.PRNGKey(0), state, jnp.int32(action), params)
        _set_gymnasium_state(gym_env, name, obs)
        gym_env.step(int(action))
        np.testing.assert_allclose(np.asarray(next_obs), np.asarray(gym_env.state, np.float64),
                                   atol=TOL, rtol=0)


def _state_from_obs(name, obs):
    if name == "mountaincar":
        from envs.mountaincar import EnvState
        return EnvState(position=jnp.float32(obs[0]), velocity=jnp.float32(obs[1]), time=0)
    from envs.cartpole import EnvState
    x, x_dot, theta, theta_dot = (jnp.float32(v) for v in obs)
    return EnvState(x=x, x_dot=x_dot, theta=theta, theta_dot=theta_dot, time=0)


def test_cartpole_derived_fields_follow_length():
    env = envs.make("cartpole")
    params = env.agent_params(np.array([[4.0, 0.2], [16.0, 0.8]]))
    np.testing.assert_allclose(params.polemass_length, [0.1 * 0.2, 0.1 * 0.8], rtol=1e-6)
    np.testing.assert_allclose(params.total_mass, [1.1, 1.1], rtol=1e-6)
    np.testing.assert_allclose(params.force_mag, [4.0, 16.0])
    assert np.all(np.asarray(params.max_steps_in_episode) == 200)


def test_known_reward_and_termination_are_pure_functions_of_observations():
    mountaincar = envs.make("mountaincar")
    next_obs = jnp.array([[0.49, 0.01], [0.5, 0.0], [0.55, -0.01], [0.6, 0.02]])
    np.testing.assert_array_equal(mountaincar.terminated(next_obs), [False, True, False, True])
    np.testing.assert_array_equal(mountaincar.reward(next_obs, jnp.zeros(4), next_obs), [-1, 0, -1, 0])
    cartpole = envs.make("cartpole")
    next_obs = jnp.array([[0.0, 0, 0.1, 0], [2.41, 0, 0, 0], [0, 0, -0.21, 0], [-2.39, 0, 0.2, 0]])
    np.testing.assert_array_equal(cartpole.terminated(next_obs), [False, True, True, False])
    np.testing.assert_array_equal(cartpole.reward(next_obs, jnp.zeros(4), next_obs), [1, 1, 1, 1])
