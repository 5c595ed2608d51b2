"""The factorised network against the paper's formula and the authors'
parameter counts; normalisation; the Simulator's predict / rollout / factors
on hand-built ensembles (trained ones are in test_train.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import paper
from persim_jax.persim import model
from persim_jax.persim.model import ModelConfig
from persim_jax.persim.simulator import Simulator


# Parameter counts of the authors' PyTorch models (docs/authors-code.md §3.2).
@pytest.mark.parametrize("config,expected", [
    (ModelConfig(num_agents=500, obs_dim=2, rank=3, num_actions=3), 3825),
    (ModelConfig(num_agents=500, obs_dim=4, rank=5, num_actions=2), 8940),
    (ModelConfig(num_agents=500, obs_dim=18, rank=15, action_dim=6, state_hidden=(512,) * 4,
                 action_hidden=(512, 512)), 1_217_656),
])
def test_parameter_counts_match_the_authors_models(config, expected):
    shapes = jax.eval_shape(lambda key: model.init_params(key, config), jax.random.PRNGKey(0))
    assert model.count_params(shapes) == expected


def test_paper_sizes():
    assert paper.model_sizes("mountaincar")["rank"] == 3
    assert paper.model_sizes("CartPole")["rank"] == 5
    cheetah = paper.model_sizes("halfcheetah")
    assert cheetah == dict(rank=20, state_hidden=(256, 512, 512), action_hidden=(256, 256))
    with pytest.raises(ValueError, match="env_name"):
        paper.model_sizes("acrobot")


def _reference_forward(params, config, agent, obs, action):
    """The paper's Δŝ_d = Σ_ℓ u_ℓ(n) v_ℓ(s, d) w_ℓ(a), written with explicit
    one-hot vectors and numpy matmuls."""
    p = jax.tree.map(np.asarray, params)
    u = np.eye(config.num_agents)[agent] @ p["agent_encoder"]["kernel"] + p["agent_encoder"]["bias"]
    h = obs
    layers = p["state_encoder"]
    for i in range(len(config.state_hidden)):
        h = np.maximum(h @ layers[f"hidden_{i}"]["kernel"] + layers[f"hidden_{i}"]["bias"], 0)
    v = (h @ layers["output"]["kernel"] + layers["output"]["bias"]).reshape(config.obs_dim,
                                                                             config.rank)
    if config.discrete:
        a = p["action_encoder"]
        w = np.eye(config.num_actions)[action] @ a["kernel"] + a["bias"]
    else:
        h = action
        a = p["action_encoder"]
        for i in range(len(config.action_hidden)):
            h = np.maximum(h @ a[f"hidden_{i}"]["kernel"] + a[f"hidden_{i}"]["bias"], 0)
        w = h @ a["output"]["kernel"] + a["output"]["bias"]
    return np.array([sum(u[l] * v[d, l] * w[l] for l in range(config.rank))
                     for d in range(config.obs_dim)])


@pytest.mark.parametrize("discrete", [True, False])
def test_forward_is_the_papers_low_rank_formula(discrete):
    config = ModelConfig(num_agents=7, obs_dim=3, rank=4, state_hidden=(16, 8),
                         action_hidden=(8,), **({"num_actions": 3} if discrete
                                                 else {"action_dim": 2}))
    params = model.init_params(jax.random.PRNGKey(0), config)
    apply = jax.jit(model.apply, static_argnums=1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        agent = int(rng.integers(7))
        obs = rng.normal(size=3).astype(np.float32)
        action = int(rng.integers(3)) if discrete else rng.normal(size=2).astype(np.float32)
        got = apply(params, config, agent, obs, action)
        np.testing.assert_allclose(got, _reference_forward(params, config, agent, obs, action),
                                   rtol=1e-5, atol=1e-6)
    # Leading batch dimensions broadcast.
    batch = apply(params, config, jnp.array([1, 2]), jnp.ones((2, 3)),
                        jnp.array([0, 1]) if discrete else jnp.ones((2, 2)))
    assert batch.shape == (2, 3)


def test_initialisation_is_pytorch_default_uniform():
    config = ModelConfig(num_agents=500, obs_dim=2, rank=3, num_actions=3)
    params = model.init_params(jax.random.PRNGKey(0), config)
    for path, fan_in in ((("agent_encoder", "kernel"), 500), (("agent_encoder", "bias"), 500),
                         (("state_encoder", "hidden_0", "kernel"), 2),
                         (("state_encoder", "output", "kernel"), 256)):
        leaf = params
        for part in path:
            leaf = leaf[part]
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(leaf).max() <= bound
        if leaf.size > 100:   # spread over the whole interval
            assert np.abs(leaf).max() > 0.9 * bound


def test_agent_factors_are_embedding_rows_plus_shared_bias():
    config = ModelConfig(num_agents=5, obs_dim=2, rank=3, num_actions=2)
    params = model.init_params(jax.random.PRNGKey(3), config)
    factors = model.agent_factors(params, config)
    enc = params["agent_encoder"]
    np.testing.assert_allclose(factors, np.eye(5) @ enc["kernel"] + enc["bias"], rtol=1e-6)


def test_model_config_validation():
    with pytest.raises(ValueError, match="num_actions / action_dim"):
        ModelConfig(num_agents=3, obs_dim=2, rank=2)
    with pytest.raises(ValueError, match="num_actions / action_dim"):
        ModelConfig(num_agents=3, obs_dim=2, rank=2, num_actions=2, action_dim=1)
    with pytest.raises(ValueError, match="rank"):
        ModelConfig(num_agents=3, obs_dim=2, rank=0, num_actions=2)


def test_stats_standardise_and_guard_constant_dimensions():
    rng = np.random.default_rng(0)
    obs = np.c_[rng.normal(3.0, 2.0, 1000), np.full(1000, 7.0)].astype(np.float32)
    next_obs = obs + np.c_[rng.normal(0.1, 0.01, 1000), np.zeros(1000)].astype(np.float32)
    action = rng.normal(5.0, 4.0, (1000, 1)).astype(np.float32)
    stats = model.compute_stats(obs, action, next_obs, discrete=False)
    z = stats.normalize_obs(obs)
    np.testing.assert_allclose(np.mean(z[:, 0]), 0, atol=1e-4)
    np.testing.assert_allclose(np.std(z[:, 0]), 1, atol=1e-4)
    assert stats.obs_std[1] == np.float32(model.STD_EPS) and np.all(np.isfinite(z))
    assert np.all(np.asarray(z[:, 1]) == 0)
    dz = stats.normalize_delta(next_obs - obs)
    np.testing.assert_allclose(np.std(dz[:, 0]), 1, atol=1e-3)
    np.testing.assert_allclose(stats.denormalize_delta(dz), next_obs - obs, atol=1e-5)
    np.testing.assert_allclose(np.std(stats.action_input(action, False)), 1, atol=1e-4)


def _simulator(discrete=True, members=3, seed=0):
    config = ModelConfig(num_agents=6, obs_dim=3, rank=2, state_hidden=(16,),
                         action_hidden=(8,), **({"num_actions": 3} if discrete
                                                 else {"action_dim": 2}))
    params = jax.vmap(model.init_params, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(seed), members), config)
    rng = np.random.default_rng(seed)
    stats = model.NormStats(
        obs_mean=jnp.asarray(rng.normal(size=3), jnp.float32),
        obs_std=jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32),
        delta_mean=jnp.asarray(rng.normal(size=3) * 0.1, jnp.float32),
        delta_std=jnp.asarray(rng.uniform(0.1, 1, 3), jnp.float32),
        action_mean=jnp.zeros((0 if discrete else 2,)), action_std=jnp.ones((0 if discrete else 2,)))
    return Simulator(params=params, stats=stats, validation_loss=jnp.zeros(members),
                     config=config)


@pytest.mark.parametrize("discrete", [True, False])
def test_predict_is_each_member_plus_denormalised_delta(discrete):
    sim = _simulator(discrete)
    obs = jnp.array([0.3, -1.0, 2.0])
    action = 2 if discrete else jnp.array([0.5, -0.5])
    predict = jax.jit(Simulator.predict)
    pred = predict(sim, 4, obs, action)
    assert pred.shape == (3, 3)
    apply = jax.jit(model.apply, static_argnums=1)
    for m in range(3):
        member = jax.tree.map(lambda x: x[m], sim.params)
        delta_z = apply(member, sim.config, 4, sim.stats.normalize_obs(obs),
                        sim.stats.action_input(jnp.asarray(action), discrete))
        np.testing.assert_allclose(pred[m], obs + delta_z * sim.stats.delta_std
                                   + sim.stats.delta_mean, rtol=1e-5, atol=1e-6)
    # Batches broadcast; vmap over agents and jit give the same numbers.
    agents = jnp.arange(6)
    obs_batch = jnp.tile(obs, (6, 1))
    actions = jnp.full((6,), action) if discrete else jnp.tile(action, (6, 1))
    batched = predict(sim, agents, obs_batch, actions)
    vmapped = jax.vmap(predict, in_axes=(None, 0, 0, 0))(
        sim, agents, obs_batch, actions)
    assert batched.shape == (3, 6, 3) and vmapped.shape == (6, 3, 3)
    np.testing.assert_allclose(batched, jnp.swapaxes(vmapped, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(batched[:, 4], pred, rtol=1e-6)
    assert not np.allclose(pred[0], pred[1])   # members differ


@pytest.mark.parametrize("discrete", [True, False])
def test_rollout_equals_chained_predictions_of_each_member(discrete):
    sim = _simulator(discrete)
    horizon = 6
    rng = np.random.default_rng(1)
    actions = (jnp.asarray(rng.integers(0, 3, horizon)) if discrete
               else jnp.asarray(rng.uniform(-1, 1, (horizon, 2)), jnp.float32))
    obs0 = jnp.array([0.1, 0.2, -0.3])
    rollout = jax.jit(Simulator.rollout)(sim, 2, obs0, actions)
    assert rollout.shape == (3, horizon, 3)
    predict = jax.jit(Simulator.predict)
    for m in range(3):
        obs = obs0
        for t in range(horizon):
            obs = predict(sim, 2, obs, actions[t])[m]   # member m from its own state
            np.testing.assert_allclose(rollout[m, t], obs, rtol=1e-5, atol=1e-5)
    # A batch of start states and action sequences: (M, H, B, D).
    batch = sim.rollout(jnp.array([2, 2]), jnp.stack([obs0, obs0]),
                        jnp.stack([actions, actions], axis=1))
    np.testing.assert_allclose(batch[:, :, 1], rollout, rtol=1e-5, atol=1e-6)


def test_agent_factors_shapes_per_member_and_all():
    sim = _simulator()
    assert sim.agent_factors().shape == (6, 2)
    assert sim.agent_factors(member=None).shape == (3, 6, 2)
    np.testing.assert_array_equal(sim.agent_factors(member=2), sim.agent_factors(None)[2])


def test_save_load_round_trip_and_interrupted_save(tmp_path, monkeypatch):
    sim = _simulator(discrete=False).replace(rank_losses=((2, 0.5), (3, 0.25)),
                                             agent_keys=("a", "b", "c", "d", "e", "f"))
    path = tmp_path / "sim.msgpack"
    sim.save(path)
    back = Simulator.load(path)
    assert back.config == sim.config and back.rank_losses == sim.rank_losses
    assert back.agent_keys == sim.agent_keys and back.agent_index("c") == 2
    for a, b in zip(jax.tree.leaves(sim), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)

    # A save interrupted before the rename leaves the previous file intact.
    before = path.read_bytes()

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        _simulator(discrete=False, seed=5).save(path)
    with pytest.raises(KeyboardInterrupt):
        sim.save(tmp_path / "other.msgpack")
    assert sorted(os.listdir(tmp_path)) == ["sim.msgpack"] and path.read_bytes() == before


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.msgpack"
    from flax import serialization

    path.write_bytes(serialization.msgpack_serialize({"format": "something else"}))
    with pytest.raises(ValueError, match="not a persim-jax simulator"):
        Simulator.load(path)
