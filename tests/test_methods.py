"""The methods protocol (`persim_jax.methods`): what PerSim and True env + MPC
hand the protocols, and each method's own keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from persim_jax import evaluation, methods, planning
from persim_jax.methods import per_agent as per_agent_lib
from persim_jax.persim.train import TrainConfig


def test_keys_are_the_methods_own():
    env = envs.make("mountaincar")
    persim = methods.PerSim(TrainConfig(rank=3))
    true_env = methods.TrueEnvMPC(env)
    # PerSim's and True env + MPC's keys are those the harness used before the protocol.
    np.testing.assert_array_equal(persim.key("train", 0, 2), jax.random.PRNGKey(2))
    np.testing.assert_array_equal(persim.key("prediction", 7, 1), jax.random.PRNGKey(1008))
    np.testing.assert_array_equal(persim.key("reward", 0, 0), jax.random.PRNGKey(2000))
    np.testing.assert_array_equal(true_env.key("reward", 5, 0), jax.random.PRNGKey(3005))

    class Other(methods.PerSim):
        name = "other"

        def key(self, stage, seed, trial=0):
            return methods.Method.key(self, stage, seed, trial)

    other = Other(TrainConfig(rank=3))
    # A new method's keys differ from every other method's, stage and trial.
    keys = {tuple(np.asarray(other.key(stage, 0, trial)).tolist())
            for stage in methods.STAGE_OFFSETS for trial in range(3)}
    keys |= {tuple(np.asarray(persim.key(stage, 0, trial)).tolist())
             for stage in methods.STAGE_OFFSETS for trial in range(3)}
    assert len(keys) == 2 * 3 * len(methods.STAGE_OFFSETS)


def test_persim_trains_and_hands_dynamics(small_mountaincar_data, tmp_path):
    transitions, _ = small_mountaincar_data
    method = methods.PerSim(TrainConfig(rank=3, ensemble_size=2, epochs=2, state_hidden=(16,)))
    simulator = method.train(transitions, method.key("train", 0), workdir=tmp_path / "ckpt")
    path = str(tmp_path / "sim.msgpack")
    method.save(simulator, path)
    loaded = method.load(path)
    for a, b in zip(jax.tree.leaves(simulator.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(a, b)

    obs = jnp.asarray(np.asarray(transitions.obs)[:6])
    action = jnp.asarray(np.asarray(transitions.action)[:6])
    covariates = jnp.zeros((1,))
    planned = method.dynamics_for_agent(simulator, [3])(0, covariates)(obs, action)
    exact = method.dynamics_for_agent(simulator, [3], for_planning=False)(0, covariates)
    assert planned.shape == (2, 6, 2)
    np.testing.assert_array_equal(exact(obs, action), simulator.predict(3, obs, action))
    np.testing.assert_allclose(planned, exact(obs, action), rtol=1e-5, atol=1e-6)
    # Per-member states: member m predicts from its own.
    members = jnp.stack([obs, obs + 0.01])
    np.testing.assert_array_equal(exact(members, action),
                                  simulator.predict_members(3, members, action))


def test_true_env_mpc_is_the_env_and_does_not_train():
    env = envs.make("cartpole")
    method = methods.TrueEnvMPC(env)
    assert not isinstance(method, methods.Trains) and not method.predicts
    # Not a `Trains`: it has no training hooks at all (no hook raising TypeError).
    assert not any(hasattr(method, hook) for hook in ("train", "save", "load"))
    covariates = jnp.asarray(env.test_agents[1], jnp.float32)
    dynamics = method.dynamics_for_agent(None, [0])(0, covariates)
    reference = planning.env_dynamics(env, env.covariates_to_params(covariates))
    obs = jnp.asarray([[0.01, 0.0, 0.02, 0.0], [0.0, 0.1, -0.03, 0.2]])
    action = jnp.asarray([0, 1])
    np.testing.assert_array_equal(dynamics(obs, action), reference(obs, action))
    assert isinstance(method.dynamics_for_agent(None, [0]), evaluation.TrueEnvDynamicsForAgent)


def test_population_and_per_agent_ablations(small_mountaincar_data, tmp_path):
    transitions, _ = small_mountaincar_data
    config = TrainConfig(rank=3, ensemble_size=2, epochs=2, state_hidden=(16,))
    population = methods.Population(config)
    pooled = population.train(transitions, population.key("train", 0))
    assert pooled.num_agents == 1                      # no agent factor to tell agents apart
    obs = jnp.asarray(np.asarray(transitions.obs)[:4])
    action = jnp.asarray(np.asarray(transitions.action)[:4])
    everyone = population.dynamics_for_agent(pooled, [0, 5, 9], for_planning=False)
    np.testing.assert_array_equal(everyone(0, None)(obs, action), everyone(2, None)(obs, action))

    per_agent = methods.PerAgent(config)
    with pytest.raises(ValueError, match="agent_ids"):
        per_agent.train(transitions, per_agent.key("train", 0))
    stacked = per_agent.train(transitions, per_agent.key("train", 0), agent_ids=[2, 7])
    # Agent 7's simulator is trained on agent 7's transitions alone.
    alone = per_agent_lib.own_trajectory(transitions, 7)
    assert alone.num_agents == 1 and alone.num_transitions == int(
        np.sum(np.asarray(transitions.agent_id) == 7))
    path = str(tmp_path / "per_agent.msgpack")
    per_agent.save(stacked, path)
    loaded = per_agent.load(path)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    rows = per_agent.dynamics_for_agent(loaded, [2, 7], for_planning=False)
    second = jax.tree.map(lambda leaf: leaf[1], loaded)
    np.testing.assert_array_equal(rows(1, None)(obs, action), second.predict(0, obs, action))
    assert not np.allclose(rows(0, None)(obs, action), rows(1, None)(obs, action))
    # A per-agent file cut short is named in one ValueError (the pipeline then
    # retrains, tests/test_cache.py).
    with open(path, "rb") as handle:
        content = handle.read()
    with open(path, "wb") as handle:
        handle.write(content[:len(content) // 2])
    with pytest.raises(ValueError, match="per_agent.msgpack: damaged"):
        per_agent.load(path)
