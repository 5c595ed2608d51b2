"""MPC episodes: True env + MPC with the paper's planners, the compiled
episode batch against a step-by-step Python loop, sharding over 4 CPU devices
against 1, and argument validation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from experiments import paper
from persim_jax import evaluation, planning


def test_true_env_mpc_keeps_the_default_cartpole_up():
    env = envs.make("cartpole")
    dynamics = evaluation.true_env_dynamics_for_agent(env)
    # The paper's planner (1000 candidates, γ = 0.93, min) with the authors'
    # CartPole horizon 50 (199.2 on average over 100 episodes of the 5 test
    # agents). With the paper's horizon 30 the cart sometimes drifts out of
    # bounds: this agent then averages 181-190 over runs of 20 episodes (the
    # paper's True env + MPC: 191.2 ± 21.0), too close to 190 for a test.
    planner = paper.planner(env, horizon=50)
    returns = evaluation.run_episodes(jax.random.PRNGKey(0), planner, dynamics, env,
                                      env.default_agent[None], num_episodes=4)
    assert returns.shape == (1, 4)
    assert returns.mean() >= 190, returns


def test_true_env_mpc_drives_the_mountaincar_to_the_goal():
    env = envs.make("mountaincar")
    planner = paper.planner(env)          # 1000 × 50, position bonus
    returns = evaluation.run_episodes(
        jax.random.PRNGKey(0), planner, evaluation.true_env_dynamics_for_agent(env), env,
        np.array([[0.0025]]), num_episodes=3)
    # -1 per step until the goal: a return above -500 reached it within the cap
    # (the paper's True env + MPC: -182.9 ± 22.9 for this agent).
    assert np.all(returns > -env.max_episode_steps), returns


def python_loop_returns(key, planner, dynamics_for_agent, env, covariates, num_episodes,
                        max_steps):
    """Reference: every episode stepped one plan at a time from Python."""
    plan = jax.jit(planner.plan, static_argnums=3)
    step = jax.jit(env.step_env)
    keys = jax.random.split(key, len(covariates) * num_episodes)
    returns = np.zeros((len(covariates), num_episodes))
    for a, cov in enumerate(covariates):
        params = env.agent_params(cov)
        dynamics = dynamics_for_agent(jnp.int32(a), jnp.asarray(cov, jnp.float32))
        for e in range(num_episodes):
            reset_key, run_key = jax.random.split(keys[a * num_episodes + e])
            obs, state = env.reset(reset_key, params)
            plan_state = planner.init()
            for step_key in jax.random.split(run_key, max_steps):
                plan_key, env_key = jax.random.split(step_key)
                action, plan_state = plan(plan_key, plan_state, obs, dynamics)
                obs, state, reward, terminated, _ = step(env_key, state, action, params)
                returns[a, e] += float(reward)
                if terminated:
                    break
    return returns


def test_compiled_episodes_equal_a_python_loop_on_a_learned_simulator(mountaincar_fit):
    simulator, _ = mountaincar_fit
    env = envs.make("mountaincar")
    # Simulator units 0..4 are the test agents; evaluate units 3 and 0.
    covariates = env.test_agents[[3, 0]]
    dynamics_for_agent = evaluation.simulator_dynamics_for_agent(simulator, agent_ids=[3, 0])
    config = paper.planner_config(env, num_candidates=64, horizon=12)
    planner = planning.random_shooting(config, env.reward, env.terminated)
    key = jax.random.PRNGKey(5)
    got = evaluation.run_episodes(key, planner, dynamics_for_agent, env, covariates,
                                  num_episodes=2, max_steps=25, chunk_size=3)
    expected = python_loop_returns(key, planner, dynamics_for_agent, env, covariates, 2, 25)
    np.testing.assert_array_equal(got, expected)


SHARDING_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    import envs
    from experiments import paper
    from persim_jax import evaluation, planning
    assert jax.device_count() == 4, jax.devices()
    env = envs.make("cartpole")
    planner = paper.planner(env, num_candidates=64, horizon=10)
    dynamics = evaluation.true_env_dynamics_for_agent(env)
    covariates = env.test_agents[:3]
    args = (jax.random.PRNGKey(0), planner, dynamics, env, covariates, 3)
    four = evaluation.run_episodes(*args, max_steps=60)
    one = evaluation.run_episodes(*args, max_steps=60, devices=jax.devices()[:1])
    chunked = evaluation.run_episodes(*args, max_steps=60, chunk_size=2)
    at_once = evaluation.run_episodes(*args, max_steps=60, chunk_size=64)
    np.testing.assert_array_equal(four, one)
    np.testing.assert_array_equal(four, chunked)
    np.testing.assert_array_equal(four, at_once)
    assert four.shape == (3, 3) and len(np.unique(four)) > 1, four
    # One program per device: no collective anywhere in the compiled step loop.
    from persim_jax.evaluation import episodes
    actor = evaluation.PlannerActorForAgent(planner, dynamics)
    program = episodes.compiled_episodes(
        episodes.split_static(actor)[1], env, 60, 1, tuple(jax.devices()))
    hlo = program.lower([], np.zeros(12, np.int32), np.zeros((12, 2), np.float32),
                        np.zeros((12, 2), np.uint32)).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo, op
    # One plan's candidates split over the 4 devices (shard_candidates, the
    # default) score as on one: random shooting on a learned-simulator-shaped
    # ensemble (shared prefix, chunks) with a candidate count that needs
    # padding, and CEM on HalfCheetah-shaped members.
    from persim_jax.persim import model
    from persim_jax.persim.simulator import Simulator
    for name, count in (("cartpole", 1001), ("halfcheetah", 30)):
        env_ = envs.make(name)
        sizes = dict(rank=3, state_hidden=(32,), action_hidden=(16,))
        config = (model.ModelConfig(num_agents=4, obs_dim=env_.obs_dim,
                                    num_actions=env_.num_actions, **sizes)
                  if env_.discrete_actions else
                  model.ModelConfig(num_agents=4, obs_dim=env_.obs_dim,
                                    action_dim=env_.action_dim, **sizes))
        params = jax.vmap(model.init_params, in_axes=(0, None))(
            jax.random.split(jax.random.PRNGKey(1), 3), config)
        dim = env_.obs_dim
        stats = model.NormStats(np.zeros(dim), np.ones(dim), np.zeros(dim), np.full(dim, 0.1),
                                *((np.zeros(0), np.ones(0)) if env_.discrete_actions else
                                  (np.zeros(env_.action_dim), np.ones(env_.action_dim))))
        simulator = Simulator(params=params, stats=stats,
                                    validation_loss=np.zeros(3), config=config)
        obs = 0.05 * jax.random.normal(jax.random.PRNGKey(2), (dim,))
        results = []
        for shard in (True, False):
            overrides = dict(shard_candidates=shard, rollout_chunk=100, horizon=8)
            overrides["num_candidates" if env_.discrete_actions else "num_samples"] = count
            if not env_.discrete_actions:
                overrides["num_elites"] = 5
            planner_ = paper.planner(env_, **overrides)
            plan = jax.jit(lambda key, obs: planner_.plan(
                key, planner_.init(), obs, planning.simulator_dynamics(simulator, 2)))
            if shard:
                text = plan.lower(jax.random.PRNGKey(3), obs).compile().as_text()
                assert "num_partitions=4" in text, name
            results.append(plan(jax.random.PRNGKey(3), obs))
        np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     results[0][1], results[1][1])
    print("OK", four.tolist())
""")


def test_four_cpu_devices_give_the_same_returns_and_plans_as_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_run_episodes_validates_its_arguments(mountaincar_fit):
    env = envs.make("cartpole")
    planner = paper.planner(env, num_candidates=8, horizon=2)
    dynamics = evaluation.true_env_dynamics_for_agent(env)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="covariates"):
        evaluation.run_episodes(key, planner, dynamics, env, np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="length"):
        evaluation.run_episodes(key, planner, dynamics, env, np.array([[10.0, 5.0]]), 1)
    with pytest.raises(ValueError, match="num_episodes"):
        evaluation.run_episodes(key, planner, dynamics, env, env.test_agents, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        evaluation.run_episodes(key, planner, dynamics, env, env.test_agents, 1, chunk_size=0)
    with pytest.raises(ValueError, match="agent_ids"):
        evaluation.simulator_dynamics_for_agent(mountaincar_fit[0], agent_ids=[0, 100])

