"""BCQ-P and BCQ-A (`persim_jax.methods.bcq`) against independent references: a plain
double-DQN update, behaviour cloning, the VAE's reconstruction and the
perturbation bound, per-agent training, the harness's episode program,
save / load and resumable checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import envs
from conftest import collect_random_actions
from persim_jax import data, evaluation
from persim_jax import methods
from persim_jax.methods import bcq
from persim_jax.methods.bcq import train as bcq_train

# Small networks and few iterations: the file runs in about 30 s on 2 cores.
DISCRETE = bcq.BCQConfig(iterations=200, q_hidden=(32, 32))
CONTINUOUS = bcq.BCQConfig(iterations=300, learning_rate=3e-3, vae_hidden=(64, 64),
                           actor_hidden=(32, 32), critic_hidden=(32, 32), acting_samples=20)


@pytest.fixture(scope="module")
def cartpole_data():
    """(Transitions, covariates): 20 CartPole agents, random actions, ≤ 40 steps each
    (437 transitions; agent 0 has 28, agent 1 21)."""
    return collect_random_actions("cartpole", jax.random.PRNGKey(5), 20, 40)


@pytest.fixture(scope="module")
def bcq_a(cartpole_data):
    """BCQ-A trained on agents 0 and 1 of `cartpole_data`."""
    method = bcq.BCQA(DISCRETE)
    trained = method.train(cartpole_data[0], method.key("train", 0), agent_ids=[0, 1])
    return method, trained


def _forward(layers, x):
    """An MLP by hand: ReLU hidden layers, linear output."""
    names = sorted((k for k in layers if k.startswith("hidden_")), key=lambda k: int(k[7:]))
    for name in names:
        x = jax.nn.relu(x @ layers[name]["kernel"] + layers[name]["bias"])
    return x @ layers["output"]["kernel"] + layers["output"]["bias"]


def _assert_trees_close(a, b, **tolerance):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


def test_config_is_validated():
    with pytest.raises(ValueError, match="threshold"):
        bcq.BCQConfig(threshold=1.0)        # strict ">": every action would be masked
    with pytest.raises(ValueError, match="batch_size"):
        bcq.BCQConfig(batch_size=0)
    with pytest.raises(ValueError, match="vae_hidden"):
        bcq.BCQConfig(vae_hidden=())
    assert bcq.BCQConfig().resolved(True).batch_size == 64
    assert bcq.BCQConfig().resolved(False).learning_rate == 1e-3


@jax.jit
def _double_dqn_update(online, target, batch):
    """(online, target) params of Q after one Adam step (3e-4) on the
    double-DQN Huber loss and a Polyak step (0.005)."""
    rows = jnp.arange(batch.action.shape[0])
    next_action = jnp.argmax(_forward(online, batch.next_obs), axis=1)
    y = batch.reward + 0.99 * batch.not_done * _forward(target, batch.next_obs)[rows, next_action]

    def huber_loss(params):
        error = _forward(params, batch.obs)[rows, batch.action] - y
        return jnp.mean(jnp.where(jnp.abs(error) < 1.0, 0.5 * error ** 2, jnp.abs(error) - 0.5))

    adam = optax.adam(3e-4)
    updates, _ = adam.update(jax.grad(huber_loss)(online), adam.init(online), online)
    online = optax.apply_updates(online, updates)
    return online, jax.tree.map(lambda p, t: 0.005 * p + 0.995 * t, online, target)


def test_threshold_zero_is_a_double_dqn_update(cartpole_data):
    transitions, _ = cartpole_data
    config = bcq.BCQConfig(threshold=0.0, q_hidden=(16, 16)).resolved(True)
    init = jax.jit(lambda key: bcq.init_discrete(key, 4, 2, config))
    state = init(jax.random.PRNGKey(0))
    # A target net unlike the online one, so that double DQN differs from DQN.
    target = init(jax.random.PRNGKey(1)).params["q"]
    state = state.replace(target_q=target)
    batch = bcq.Batch(*(jnp.asarray(np.asarray(x)) for x in (
        transitions.obs, transitions.action, transitions.next_obs, transitions.reward)),
        not_done=jnp.asarray(1.0 - np.asarray(transitions.done, np.float32)))
    assert float(batch.not_done.min()) == 0.0          # terminal rows are in the batch
    new, _ = jax.jit(bcq.discrete_update, static_argnums=3)(state, batch, None, config)

    online = state.params["q"]
    expected, expected_target = _double_dqn_update(online, target, batch)
    _assert_trees_close(new.params["q"], expected, rtol=1e-5, atol=1e-7)
    _assert_trees_close(new.target_q, expected_target, rtol=1e-5, atol=1e-7)
    # The imitation net trains too.
    assert not np.allclose(new.params["g"]["output"]["kernel"],
                           state.params["g"]["output"]["kernel"])


@pytest.fixture(scope="module")
def cloning(cartpole_data):
    """(method, trained, rule actions): BCQ-P with threshold just below 1 on
    `cartpole_data` relabelled with a fixed rule action = f(obs)."""
    transitions, _ = cartpole_data
    rule = (np.asarray(transitions.obs)[:, 3] > 0).astype(np.int32)   # push with the swing
    assert 200 <= transitions.num_transitions and 0.2 < rule.mean() < 0.8
    method = bcq.BCQP(bcq.BCQConfig(iterations=400, threshold=0.999, learning_rate=3e-3,
                                    q_hidden=(32, 32)))
    trained = method.train(transitions.replace(action=rule), method.key("train", 0),
                           agent_ids=[0, 1])
    return method, trained, rule


def test_threshold_near_one_clones_the_logged_actions(cartpole_data, cloning):
    _, trained, rule = cloning
    # Only the argmax of G passes the mask: the policy is behaviour cloning.
    actions = jax.jit(jax.vmap(trained.policy(0), in_axes=(None, 0)))(
        jax.random.PRNGKey(0), np.asarray(cartpole_data[0].obs))
    assert np.mean(np.asarray(actions) == rule) >= 0.95


def _continuous_transitions(num=200, obs_dim=4, action_dim=2):
    """One agent's trajectory whose action is a fixed function of the state."""
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(num, obs_dim)).astype(np.float32)
    weights = rng.normal(size=(obs_dim, action_dim)).astype(np.float32)
    action = np.tanh(obs @ weights)
    next_obs = 0.9 * obs + 0.1 * np.pad(action, ((0, 0), (0, obs_dim - action_dim)))
    return data.make_transitions(obs, action, next_obs, np.zeros(num, np.int32),
                                 reward=-np.sum(obs ** 2, axis=1))


@pytest.fixture(scope="module")
def continuous_fit():
    transitions = _continuous_transitions()
    return transitions, bcq.fit(transitions, CONTINUOUS, key=jax.random.PRNGKey(0),
                                progress=False)


@jax.jit
def _continuous_probe(trained: bcq.BCQPolicies, obs, keys):
    """(decoded actions (T, A) of every state; for the first K states, the
    action the policy chose with keys[k] (K, A) and the 20 samples (K, 20, A)
    it decoded with the same key)."""
    vae = jax.tree.map(lambda leaf: leaf[0], trained.params["vae"])
    decoded = bcq.decode(vae, obs, keys[0], 1.0)
    states = obs[:keys.shape[0]]
    chosen = jax.vmap(trained.policy(0))(keys, states)
    samples = jax.vmap(lambda k, o: bcq.decode(vae, jnp.broadcast_to(o, (20, 4)), k, 1.0))(
        keys, states)
    return decoded, chosen, samples


def test_vae_reconstructs_and_actions_stay_near_decoded_ones(continuous_fit):
    transitions, trained = continuous_fit
    obs, action = jnp.asarray(transitions.obs), np.asarray(transitions.action)
    decoded, chosen, samples = _continuous_probe(trained, obs,
                                                 jax.random.split(jax.random.PRNGKey(2), 50))
    assert np.mean((np.asarray(decoded) - action) ** 2) < 0.1 * action.var()
    # The chosen action is a decoded sample moved by at most Φ · max_action.
    distance = np.max(np.abs(np.asarray(chosen)[:, None] - np.asarray(samples)), axis=2)
    assert chosen.shape == (50, 2) and np.all(distance.min(axis=1) <= 0.05 + 1e-6)
    # The bound holds for any actor, state and action in the box.
    actions = jax.random.uniform(jax.random.PRNGKey(4), (500, 2), minval=-1.0, maxval=1.0)
    states = 100.0 * jax.random.normal(jax.random.PRNGKey(5), (500, 4))
    actor = jax.tree.map(lambda leaf: 10.0 * leaf[0], trained.params["actor"])
    shifted = jax.jit(bcq.perturb, static_argnums=(3, 4))(actor, states, actions, 0.05, 1.0)
    assert np.max(np.abs(np.asarray(shifted - actions))) <= 0.05 + 1e-6
    assert np.max(np.abs(np.asarray(shifted))) <= 1.0


def test_bcq_a_trains_each_agent_on_its_own_trajectory(cartpole_data, bcq_a):
    transitions, _ = cartpole_data
    method, trained = bcq_a
    assert trained.agent_ids == (0, 1)
    kernels = np.asarray(trained.params["q"]["output"]["kernel"])
    assert kernels.shape[0] == 2 and not np.allclose(kernels[0], kernels[1])
    # Agent 1's policy is what training on agent 1's transitions alone gives:
    # the vmapped policies sample only their own rows.
    counts = transitions.transitions_per_agent()
    assert counts[0] > counts[1]        # agent 1's rows are padded when trained beside agent 0
    alone = bcq.fit(transitions, DISCRETE, key=method.key("train", 0), agent_ids=[1],
                    chunk_iterations=100, progress=False)
    _assert_trees_close(alone.params, jax.tree.map(lambda x: x[1:], trained.params),
                        rtol=1e-4, atol=1e-5)
    # Row i of the evaluated agents gets agent_ids[i]'s policy.
    for_agent = method.policy_for_agent(trained, [1, 0])
    np.testing.assert_array_equal(for_agent(0, None).params["q"]["output"]["bias"],
                                  trained.params["q"]["output"]["bias"][1])
    with pytest.raises(ValueError, match="agent_ids"):
        method.policy_for_agent(trained, [2])
    with pytest.raises(ValueError, match="agent_ids"):
        method.train(transitions, method.key("train", 0))


def test_policies_play_episodes_of_the_harness(cartpole_data, cloning, bcq_a):
    _, covariates = cartpole_data
    env = envs.make("cartpole")
    bcq_p, shared, _ = cloning
    # A model-free method that trains: a policy per agent, no dynamics to score.
    assert bcq_p.name == "bcq_p"
    assert isinstance(bcq_p, methods.ModelFree) and isinstance(bcq_p, methods.Trains)
    assert not isinstance(bcq_p, methods.ModelBased)
    # BCQ-P: one policy for every agent, whatever the agent ids.
    assert shared.agent_ids is None and shared.params["q"]["output"]["bias"].shape[0] == 1
    for method, trained in ((bcq_p, shared), bcq_a):
        returns = evaluation.run_policy_episodes(
            jax.random.PRNGKey(0), method.policy_for_agent(trained, [0, 1]), env,
            covariates[:2], 1, max_steps=10)
        assert returns.shape == (2, 1) and np.all(np.isfinite(returns))
        assert np.all((returns >= 1) & (returns <= 10))


def test_save_load_round_trip(bcq_a, continuous_fit, tmp_path):
    method, trained = bcq_a
    for name, original in (("discrete", trained), ("continuous", continuous_fit[1])):
        path = tmp_path / f"{name}.msgpack"
        method.save(original, path)
        loaded = method.load(path)
        assert loaded.config == original.config and loaded.agent_ids == original.agent_ids
        jax.tree.map(np.testing.assert_array_equal, loaded.params, original.params)
    assert method.description()["threshold"] == 0.3


def test_checkpoints_resume_and_refuse_another_run(cartpole_data, tmp_path, monkeypatch):
    transitions, _ = cartpole_data
    run = dict(key=jax.random.PRNGKey(4), agent_ids=[1], chunk_iterations=100, progress=False)
    bcq.fit(transitions, dataclasses.replace(DISCRETE, iterations=100), checkpoint_dir=tmp_path,
            **run)
    chunks = []                      # the lengths of the chunks trained
    make_chunk_fn = bcq.make_chunk_fn
    monkeypatch.setattr(bcq_train, "make_chunk_fn",
                        lambda *args: chunks.append(args[2]) or make_chunk_fn(*args))
    resumed = bcq.fit(transitions, DISCRETE, checkpoint_dir=tmp_path, **run)
    assert chunks == [100]           # iterations 100..199 only
    straight = bcq.fit(transitions, DISCRETE, **run)
    _assert_trees_close(resumed.params, straight.params, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="different run"):
        bcq.fit(transitions, DISCRETE, checkpoint_dir=tmp_path,
                **{**run, "key": jax.random.PRNGKey(5)})
