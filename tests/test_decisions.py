"""Decisions on a user's own data (issue 26): `SimulatorEnv` under gymnax's
conventions, the values and rankings of `persim_jax.decisions`, the reward
model, `experiments.run --decide` end to end with its bad inputs (the check
where the truth is known: tests/test_decisions_truth.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from experiments.examples import cartpole as cartpole_example
from experiments.examples import mountaincar as mountaincar_example
from persim_jax import SimulatorEnv, decisions, planning
from persim_jax.evaluation.episodes import PolicyActor
from persim_jax.persim import train
from persim_jax.reward_model import fit_reward_model
from persim_jax.simulator_env import logged_initial_states
from test_own_data import COLUMN_FLAGS, DRIVER, IDS, ROOT, make_patients

MEMBERS = 3


@pytest.fixture(scope="module")
def simulator(small_mountaincar_data):
    transitions, _ = small_mountaincar_data
    return train.fit(transitions, rank=3, key=jax.random.PRNGKey(1), ensemble_size=MEMBERS,
                     epochs=3, state_hidden=(16,), progress=False)


@pytest.fixture(scope="module")
def sim_env(simulator, small_mountaincar_data):
    transitions, _ = small_mountaincar_data
    env = envs.make("mountaincar")
    states, agents = logged_initial_states(transitions)
    return SimulatorEnv(simulator, env.reward, states, initial_agents=agents,
                        terminated_fn=env.terminated, max_steps=7, member=1)


# ---------------------------------------------------------------------------
# SimulatorEnv


def test_simulator_env_steps_are_the_simulators_predictions(sim_env, simulator):
    params = sim_env.agent_params([0, 4, 9])
    assert params.agent.shape == (3,)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    obs, state = jax.jit(jax.vmap(sim_env.reset))(keys, params)
    assert obs.shape == (3, 2) and state.member.tolist() == [1, 1, 1]
    action = jnp.array([0, 1, 2])
    next_obs, state, reward, done, info = jax.jit(jax.vmap(sim_env.step))(
        keys, state, action, params)
    expected = simulator.predict(jnp.array([0, 4, 9]), obs, action)[1]      # member 1
    np.testing.assert_allclose(info["final_observation"], expected, rtol=1e-6, atol=1e-6)
    assert reward.shape == (3,) and done.dtype == bool
    assert state.time.tolist() == [1, 1, 1]
    # The start state is the agent's own logged first state.
    states, agents = np.asarray(sim_env.initial_states), np.asarray(sim_env.initial_agents)
    np.testing.assert_array_equal(obs[1], states[agents == 4][0])


def test_simulator_env_member_modes_and_spaces(simulator, small_mountaincar_data):
    transitions, _ = small_mountaincar_data
    states, agents = logged_initial_states(transitions)
    reward = lambda o, a, n: -jnp.abs(n[0])
    mean_env = SimulatorEnv(simulator, reward, states, initial_agents=agents, member="mean")
    sample_env = SimulatorEnv(simulator, reward, states, initial_agents=agents)
    params = mean_env.agent_params(2)
    obs, state = mean_env.reset(jax.random.PRNGKey(0), params)
    next_obs, *_ = mean_env.step_env(jax.random.PRNGKey(1), state, 1, params)
    np.testing.assert_allclose(next_obs, simulator.predict(2, obs, 1).mean(0), rtol=1e-6,
                               atol=1e-6)
    members = jax.vmap(lambda k: sample_env.reset(k, params)[1].member)(
        jax.random.split(jax.random.PRNGKey(0), 64))
    assert set(np.asarray(members).tolist()) == set(range(MEMBERS))
    assert mean_env.action_space(params).n == 3
    assert mean_env.observation_space(params).shape == (2,)
    with pytest.raises(ValueError, match="member"):
        SimulatorEnv(simulator, reward, states, initial_agents=agents, member=MEMBERS)
    with pytest.raises(ValueError, match="no start state"):
        SimulatorEnv(simulator, reward, states[:3], initial_agents=agents[:3])
    with pytest.raises(ValueError, match="outside"):
        mean_env.agent_params(simulator.num_agents)


def test_random_policy_episodes_run_under_jit_with_auto_reset(sim_env):
    params = sim_env.agent_params(list(range(4)))
    space = sim_env.action_space(params)

    @jax.jit
    def episodes(key):
        keys = jax.random.split(key, 4)
        obs, state = jax.vmap(sim_env.reset)(keys, params)

        def step(carry, key):
            obs, state = carry
            action_key, step_key = jax.random.split(key)
            action = jax.vmap(space.sample)(jax.random.split(action_key, 4))
            obs, state, reward, done, _ = jax.vmap(sim_env.step)(
                jax.random.split(step_key, 4), state, action, params)
            return (obs, state), (reward, done, state.time)

        _, (rewards, dones, times) = jax.lax.scan(step, (obs, state),
                                                  jax.random.split(key, 20))
        return rewards, dones, times

    rewards, dones, times = episodes(jax.random.PRNGKey(3))
    assert rewards.shape == (20, 4) and np.all(np.isfinite(rewards))
    assert np.all(np.asarray(dones)[6])              # max_steps 7: every episode truncated
    assert np.all(np.asarray(times) <= 7)


# ---------------------------------------------------------------------------
# Values, plans, rankings


def test_policy_values_match_a_hand_rollout(sim_env, simulator):
    starts = jnp.asarray(np.asarray(sim_env.initial_states)[:2])[:, None]    # (2, 1, D)
    right = lambda agent, logged: PolicyActor(lambda key, obs: jnp.int32(2))
    values = decisions.policy_values(jax.random.PRNGKey(0), sim_env, right, [0, 1], starts, 5)
    assert values.shape == (2, 1, MEMBERS)
    # Member m of agent 1, by hand: -1 per step until the flag.
    obs, total = starts[1, 0], 0.0
    for _ in range(5):
        obs = simulator.predict(1, obs, 2)[2]
        total -= 1.0
    assert float(values[1, 0, 2]) == total
    logged = jnp.full((2, 1, 5), 2, jnp.int32)
    replayed = decisions.policy_values(jax.random.PRNGKey(0), sim_env,
                                       lambda agent, actions: decisions.LoggedActor(actions),
                                       [0, 1], starts, 5, logged=logged)
    np.testing.assert_array_equal(replayed, values)


def test_recommendation_is_the_planners_best_sequence(simulator):
    env = envs.make("mountaincar")
    config = planning.RandomShootingConfig(num_actions=3, num_candidates=64, horizon=6)
    planner = planning.random_shooting(config, env.reward, env.terminated)
    obs = jnp.array([[-0.5, 0.0], [-0.4, 0.01]])
    plan = decisions.recommend(jax.random.PRNGKey(0), planner, simulator, [0, 3], obs,
                               env.reward, env.terminated)
    assert plan.action.shape == (2,) and plan.sequence.shape == (2, 6)
    np.testing.assert_array_equal(plan.action, plan.sequence[:, 0])
    assert plan.member_returns.shape == (2, MEMBERS)


def test_ranking_names_ties_and_the_members_agreement():
    tie = decisions.ranking({"a": [1.0, 1.0], "b": [1.0, 1.0]})
    assert tie["best"] is None and tie["tied"] == ["a", "b"] and tie["agreement"] == 1.0
    split = decisions.ranking({"a": [1.0, 2.0, 3.0], "b": [2.0, 2.0, 2.5]})
    assert split["best"] == "b" and split["order"] == ["b", "a"]
    assert split["agreement"] == pytest.approx(2 / 3)


def test_box_actions_map_to_the_data_range():
    box = decisions.ActionBox(jnp.array([-2.0, 0.0]), jnp.array([3.0, 1.0]))
    np.testing.assert_allclose(box.to_env(jnp.array([[-1.0, 1.0], [0.0, 5.0]])),
                               [[-2.0, 1.0], [0.5, 1.0]])


@pytest.mark.parametrize("env_name, example", [("cartpole", cartpole_example),
                                               ("mountaincar", mountaincar_example)])
def test_example_functions_are_the_envs_rules(env_name, example):
    env = envs.make(env_name)
    key = jax.random.PRNGKey(0)
    scale = jnp.array([2.6, 2.0, 0.25, 2.0]) if env_name == "cartpole" else jnp.array([0.7, 0.07])
    offset = jnp.zeros(4) if env_name == "cartpole" else jnp.array([-0.1, 0.0])
    next_obs = offset + scale * jax.random.uniform(key, (500, env.obs_dim), minval=-1, maxval=1)
    obs, action = next_obs, jnp.zeros(500, jnp.int32)
    np.testing.assert_array_equal(decisions.per_transition(example.terminated, 1)(next_obs),
                                  env.terminated(next_obs))
    np.testing.assert_array_equal(decisions.per_transition(example.reward, 3)(obs, action, next_obs),
                                  env.reward(obs, action, next_obs))
    assert np.any(env.terminated(next_obs)) and not np.all(env.terminated(next_obs))


def test_reward_model_learns_a_reward_and_reports_its_held_out_error(small_mountaincar_data):
    transitions, _ = small_mountaincar_data
    target = -10.0 * np.abs(np.asarray(transitions.next_obs)[:, 1]) + np.asarray(
        transitions.action == 2, np.float32)
    transitions = transitions.replace(reward=target.astype(np.float32))
    train_index = np.arange(transitions.num_transitions) % 5 != 0
    model, error = fit_reward_model(transitions.select(train_index), jax.random.PRNGKey(0),
                                    held_out=transitions.select(~train_index), epochs=60)
    assert error["r2"] > 0.9 and error["rmse"] < 0.3 * error["constant_rmse"]
    batch = model(transitions.obs[:6].reshape(2, 3, 2), transitions.action[:6].reshape(2, 3),
                  transitions.next_obs[:6].reshape(2, 3, 2))
    assert batch.shape == (2, 3)


# ---------------------------------------------------------------------------
# The CLI


USER_FILE = textwrap.dedent("""
    import jax.numpy as jnp

    def reward(obs, action, next_obs):
        return -jnp.abs(next_obs[0] - 100.0)

    def no_dose(key, obs):
        return jnp.zeros(1)

    def full_dose(key, obs):
        return jnp.ones(1)

    def broken(obs, action, next_obs):
        raise RuntimeError("the user's bug")

    def vector(obs, action, next_obs):
        return next_obs

    def nan(obs, action, next_obs):
        return jnp.nan * obs[0]

    def three_actions(key, obs):
        return jnp.zeros(3)
""")
TINY = ["--epochs=4", "--ensemble_size=2", "--state_hidden=16", "--action_hidden=16",
        "--rank=2", "--batch_size=32", "--open_loop_steps=3", "--candidates=16",
        "--horizon=4", "--cem_rounds=1", "--cem_elites=4"]


def _check_decisions(run, csv_path):
    results = json.loads((run / "results.json").read_text())
    assert list(results["decisions"]) == [IDS[0], IDS[3]]
    doses = np.asarray([float(line.split(",")[4])
                        for line in csv_path.read_text().splitlines()[1:]])
    for row in results["decisions"].values():
        (action,) = row["recommended_action"]
        assert doses.min() <= action <= doses.max()
        assert len(row["recommended_plan"]) == 4              # the planner's horizon
        assert set(row["policies"]) == {"logged", "mpc", "no_dose", "full_dose"}
        for value in row["policies"].values():
            assert value["min"] <= value["mean"] <= value["max"]
            assert np.isfinite(value["population"])
        assert 0.0 <= row["agreement"] <= 1.0
        assert row["best"] in row["policies"] or row["best"] is None
    assert results["decision_summary"]["reward"] == {"source": "function",
                                                     "spec": f"{csv_path.parent / 'mine.py'}:reward"}
    assert "## Decisions" in (run / "report.md").read_text()


def test_decide_end_to_end_and_its_bad_inputs(tmp_path):
    """One interpreter: a run with --decide, then every bad input (one line,
    exit 2, no output)."""
    good = tmp_path / "patients.csv"
    make_patients(good, steps=24)
    mine = tmp_path / "mine.py"
    mine.write_text(USER_FILE)
    (tmp_path / "syntax.py").write_text("def reward(:\n")
    decide = [f"--dataset={good}", *COLUMN_FLAGS, *TINY, f"--out_dir={tmp_path / 'good'}",
              "--decide", f"--reward={mine}:reward",
              f"--policies={mine}:no_dose,{mine}:full_dose",
              f"--decision_agents={IDS[0]},{IDS[3]}", "--decision_horizon=5",
              "--decision_starts=2"]
    cases = [
        (["--decide", f"--reward={tmp_path / 'missing.py'}:reward"], "no such file"),
        (["--decide", f"--reward={mine}:nope"], "no function 'nope'"),
        (["--decide", f"--reward={tmp_path / 'syntax.py'}:reward"], "failed to load"),
        (["--decide", f"--reward={mine}:broken"], "the user's bug"),
        (["--decide", f"--reward={mine}:vector"], "one number per transition"),
        (["--decide", f"--reward={mine}:nan"], "NaN"),
        (["--decide", f"--reward={mine}:reward", f"--policies={mine}:three_actions"],
         "--policies"),
        ([f"--reward={mine}:reward"], "applies with --decide"),
        (["--decide", f"--reward={mine}:reward", "--decision_horizon=500"], "fewer than"),
        (["--decide", f"--reward={mine}:reward", "--decision_agents=nobody"], "not one of"),
        (["--decide"], "needs a reward"),
        (["--decide", f"--reward={mine}:reward", "--action_low=5", "--action_high=1"],
         "low < high"),
    ]
    argvs = [decide] + [[f"--dataset={good}", *COLUMN_FLAGS, *flags_, "--epochs=1",
                         f"--out_dir={tmp_path / 'out'}"] for flags_, _ in cases]
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcomes[0]["code"] == 0, outcomes[0]["stderr"][-3000:]
    _check_decisions(tmp_path / "good" / "custom" / "patients", good)
    for (flags_, word), outcome in zip(cases, outcomes[1:]):
        lines = outcome["stderr"].strip().splitlines()
        assert outcome["code"] == 2, (flags_, outcome)
        assert len(lines) == 1 and lines[0].startswith("error: "), (flags_, outcome["stderr"])
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "out").exists()
