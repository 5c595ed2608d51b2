"""The environment registry, agent descriptions, input validation, and
heterogeneous batching of the classic-control envs (HalfCheetah's batching is
in test_halfcheetah.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs

CLASSIC = ("mountaincar", "cartpole")

PAPER_TABLE_1 = {
    "mountaincar": (("gravity",), [(0.0001, 0.0035)],
                    [(0.0001,), (0.0005,), (0.0010,), (0.0025,), (0.0035,)], 5),
    "cartpole": (("force", "length"), [(2.0, 18.0), (0.15, 0.85)],
                 [(2.0, 0.5), (10.0, 0.5), (18.0, 0.5), (10.0, 0.85), (10.0, 0.15)], 5),
    "halfcheetah": (("mass_scale", "damping_scale"), [(0.2, 1.8), (0.2, 1.8)],
                    [(0.3, 1.7), (1.7, 0.3), (0.3, 0.3), (1.7, 1.7), (1.0, 1.0)], 4),
}


def test_make_rejects_unknown_names_and_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        envs.make("acrobot")
    for name in envs.ENV_NAMES:
        assert name in str(error.value)
    assert "acrobot" in str(error.value)


@pytest.mark.parametrize("name", envs.ENV_NAMES)
def test_agent_descriptions_follow_table_1(name):
    env = envs.make(name)
    names, ranges, test_agents, num_policy_agents = PAPER_TABLE_1[name]
    assert env.covariate_names == names
    np.testing.assert_allclose(env.covariate_ranges, ranges)
    np.testing.assert_allclose(env.test_agents, test_agents)
    assert env.policy_training_agents.shape == (num_policy_agents, len(names))
    env.agent_params(env.default_agent)  # in range


@pytest.mark.parametrize("name", CLASSIC)
def test_sample_agents_puts_test_agents_first_and_the_rest_uniform(name):
    env = envs.make(name)
    covariates = np.asarray(env.sample_agents(jax.random.PRNGKey(3), 2000))
    assert covariates.shape == (2000, len(env.covariate_names))
    np.testing.assert_allclose(covariates[:5], env.test_agents, rtol=1e-6)
    rest = covariates[5:]
    for j, (low, high) in enumerate(env.covariate_ranges):
        assert rest[:, j].min() >= low and rest[:, j].max() <= high
        # Uniform: mean and sd of U(low, high), within a few standard errors.
        assert abs(rest[:, j].mean() - (low + high) / 2) < 4 * (high - low) / np.sqrt(12 * len(rest))
        assert abs(rest[:, j].std() - (high - low) / np.sqrt(12)) < 0.05 * (high - low)
    again = np.asarray(env.sample_agents(jax.random.PRNGKey(3), 2000))
    np.testing.assert_array_equal(covariates, again)
    np.testing.assert_allclose(env.sample_agents(jax.random.PRNGKey(3), 3), env.test_agents[:3])


@pytest.mark.parametrize("name", CLASSIC)
def test_agent_params_accepts_one_agent_or_a_batch(name):
    env = envs.make(name)
    one = env.agent_params(env.default_agent)
    assert all(jnp.shape(leaf) == () for leaf in jax.tree.leaves(one))
    batch = env.agent_params(env.test_agents)
    assert all(jnp.shape(leaf) == (5,) for leaf in jax.tree.leaves(batch))


@pytest.mark.parametrize(
    "name,covariates,words",
    [
        ("mountaincar", [0.004], ["gravity", "0.0001", "0.0035"]),
        ("mountaincar", [0.00005], ["gravity", "range"]),
        ("mountaincar", [float("nan")], ["gravity", "nan"]),
        ("mountaincar", [0.001, 0.5], ["shape", "gravity"]),
        ("cartpole", [1.0, 0.5], ["force", "[2, 18]"]),
        ("cartpole", [10.0, 0.9], ["length", "[0.15, 0.85]"]),
        ("cartpole", [[10.0, 0.5], [10.0, float("inf")]], ["length", "agent 1"]),
        ("cartpole", [10.0], ["shape", "force", "length"]),
        ("cartpole", np.zeros((2, 2, 2)), ["shape"]),
    ],
)
def test_bad_covariates_raise_clear_errors(name, covariates, words):
    env = envs.make(name)
    with pytest.raises(ValueError) as error:
        env.agent_params(covariates)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_extrapolation_is_an_explicit_opt_in():
    env = envs.make("cartpole")
    params = env.agent_params([25.0, 1.2], allow_extrapolation=True)
    np.testing.assert_allclose(params.polemass_length, 0.12, rtol=1e-6)
    with pytest.raises(ValueError, match="length.*positive"):
        env.agent_params([10.0, -0.5], allow_extrapolation=True)
    with pytest.raises(ValueError, match="force"):
        env.agent_params([float("nan"), 0.5], allow_extrapolation=True)


def test_nearest_policy_training_agent_uses_range_normalised_distance():
    env = envs.make("cartpole")
    # Force 8 is 2/16 of its range from force 6 (or 10); length 0.5 is exact:
    # the nearest is (6, .5) or (10, .5) but never the length-shifted agents.
    idx = np.asarray(env.agents.nearest(jnp.array([[7.0, 0.5], [10.0, 0.7], [10.0, 0.3]])))
    np.testing.assert_array_equal(idx, [0, 3, 4])


NUM_AGENTS = 500
NUM_STEPS = 25


@functools.partial(jax.jit, static_argnums=0)
def _rollout_batched(env, keys, params, actions):
    """(A,) agents stepped together by one vmapped step inside a scan."""
    obs, state = jax.vmap(env.reset)(keys, params)

    def one_step(state, inputs):
        step_keys, action = inputs
        obs, state, reward, done, _ = jax.vmap(env.step)(step_keys, state, action, params)
        return state, (obs, reward, done)

    step_keys = jax.vmap(lambda k: jax.random.split(k, NUM_STEPS))(keys).swapaxes(0, 1)
    _, out = jax.lax.scan(one_step, state, (step_keys, actions))
    return obs, out


@functools.partial(jax.jit, static_argnums=0)
def _rollout_one(env, key, params, actions):
    """One agent alone: (T,) actions -> its trajectory."""
    obs, state = env.reset(key, params)

    def one_step(state, inputs):
        step_key, action = inputs
        obs, state, reward, done, _ = env.step(step_key, state, action, params)
        return state, (obs, reward, done)

    _, out = jax.lax.scan(one_step, state, (jax.random.split(key, NUM_STEPS), actions))
    return obs, out


@pytest.mark.parametrize("name", CLASSIC)
def test_500_agents_in_one_vmapped_step_equal_each_agent_alone(name):
    env = envs.make(name)
    key = jax.random.PRNGKey(11)
    covariates = env.sample_agents(key, NUM_AGENTS)
    params = env.agent_params(covariates)
    keys = jax.random.split(jax.random.PRNGKey(12), NUM_AGENTS)
    actions = jax.random.randint(jax.random.PRNGKey(13), (NUM_STEPS, NUM_AGENTS), 0, env.num_actions)
    batched = _rollout_batched(env, keys, params, actions)

    # Each agent alone, in one program (lax.map runs the agents one by one)...
    def alone(args):
        key, p, a = args
        return _rollout_one(env, key, p, a)

    sequential = jax.lax.map(alone, (keys, params, actions.T))
    obs0, (obs, reward, done) = batched
    obs0_seq, (obs_seq, reward_seq, done_seq) = sequential
    np.testing.assert_allclose(obs0, obs0_seq, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(obs.swapaxes(0, 1), obs_seq, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reward.T, reward_seq)
    np.testing.assert_array_equal(done.T, done_seq)
    # ... and a few of them with their own jitted single-agent call.
    for unit in (0, 4, 137, 499):
        one = jax.tree.map(lambda leaf: leaf[unit], params)
        obs0_one, (obs_one, _, _) = _rollout_one(env, keys[unit], one, actions[:, unit])
        np.testing.assert_allclose(obs[:, unit], obs_one, rtol=1e-5, atol=1e-6)
    # The agents really differ: the same state and action give different next states.
    same_state = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf[0], leaf.shape),
                              jax.vmap(env.reset)(keys, params)[1])
    next_obs = jax.vmap(env.step)(keys, same_state, jnp.zeros(NUM_AGENTS, jnp.int32), params)[0]
    assert np.unique(np.asarray(next_obs).round(7), axis=0).shape[0] > NUM_AGENTS // 2
