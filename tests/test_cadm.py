"""Vanilla and PE-TS CaDM (`persim_jax.methods.cadm`): the context history against
its definition, what the learned context knows about an agent, PE-TS's
disagreement off the data, the protocols' handling of a context, save / load
and resumable checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from sklearn.linear_model import LinearRegression

import envs
from conftest import collect_random_actions
from persim_jax import data, evaluation, planning
from persim_jax.methods import cadm

# Small networks, a raised step size and 2 × 5 epochs of 2e4 pairs: the
# learned context of CartPole then tells the push force apart (held-out R²
# ≈ 0.97); the file runs in about 40 s on 2 cores.
SMALL = cadm.CaDMConfig(iterations=2, epochs=5, pairs_per_epoch=20_000, hidden=(64, 64),
                        encoder_hidden=(64, 32), batch_size=128, learning_rate=3e-3)
TINY = dataclasses.replace(SMALL, iterations=2, epochs=1, pairs_per_epoch=512, hidden=(16,),
                           encoder_hidden=(16,))


@pytest.fixture(scope="module")
def cartpole_data():
    """(Transitions, covariates): 200 CartPole agents, random actions, ≤ 60 steps."""
    return collect_random_actions("cartpole", jax.random.PRNGKey(0), 200, 60)


@pytest.fixture(scope="module")
def vanilla(cartpole_data):
    return cadm.fit(cartpole_data[0], SMALL, key=jax.random.PRNGKey(0), progress=False)


def _agent_contexts(model: cadm.CaDMModel, transitions) -> np.ndarray:
    """(N, C) each agent's mean context (member 0) over its anchors with at
    least 3 transitions of history."""
    data = cadm.pair_data(transitions, model.config)
    order, _ = cadm.path_rows(transitions)
    agent = np.asarray(transitions.agent_id)[order]
    history = cadm.gather_history(data, jnp.arange(data.obs.shape[0]))
    encoder = jax.tree.map(lambda leaf: leaf[0], model.params["members"]["encoder"])
    contexts = np.asarray(cadm.encode_context(encoder, history))
    enough = np.asarray(data.history[:, 2] >= 0)
    return np.stack([contexts[(agent == a) & enough].mean(0)
                     for a in range(transitions.num_agents)])


def test_config_is_validated():
    with pytest.raises(ValueError, match="particles"):
        cadm.CaDMConfig(ensemble_size=5, particles=7)
    with pytest.raises(ValueError, match="hidden"):
        cadm.CaDMConfig(hidden=())
    with pytest.raises(ValueError, match="validation_fraction"):
        cadm.CaDMConfig(validation_fraction=1.0)
    assert cadm.PE_TS.particles == 20 and cadm.PE_TS.ensemble_size == 5
    assert cadm.VANILLA.iterations == 100 and not cadm.VANILLA.probabilistic


def test_history_slots_and_pairs():
    # Two paths: rows 0..12 and 13..15.
    start = np.zeros(16, bool)
    start[[0, 13]] = True
    index = cadm.history_index(start, history=10)
    np.testing.assert_array_equal(index[0], [-1] * 10)                     # t = 0: empty
    np.testing.assert_array_equal(index[2], [0, 1] + [-1] * 8)             # [Δs0, Δs1, 0, ...]
    np.testing.assert_array_equal(index[10], np.arange(10))                 # full
    np.testing.assert_array_equal(index[11], np.arange(1, 11))              # the window slides
    np.testing.assert_array_equal(index[14], [13] + [-1] * 9)               # a new path
    pairs = cadm.pair_index(start, future=3)
    same_path = (pairs[:, 0] >= 13) == (pairs[:, 1] >= 13)
    assert same_path.all() and (pairs[:, 1] - pairs[:, 0] < 3).all()
    assert len(pairs) == (13 + 12 + 11) + (3 + 2 + 1)


def test_observe_builds_the_training_history(cartpole_data, vanilla):
    """The context at evaluation (one `observe` per real transition) is the
    one training used for the same step of the same trajectory."""
    transitions, _ = cartpole_data
    data = cadm.pair_data(transitions, vanilla.config)
    order, start = cadm.path_rows(transitions)
    rows = np.flatnonzero(np.asarray(transitions.agent_id)[order] == 3)
    assert len(rows) > 12 and start[rows[0]]
    model = cadm.CaDMDynamics(vanilla)
    context = model.init(jax.random.PRNGKey(0))
    obs, next_obs = np.asarray(data.obs), np.asarray(data.next_obs)
    action = np.asarray(transitions.action)[order]
    for t, row in enumerate(rows[:13]):
        expected = cadm.gather_history(data, jnp.asarray([row]))[0]
        np.testing.assert_allclose(cadm.flat_history(context.deltas, context.actions), expected,
                                   rtol=1e-6, atol=1e-7, err_msg=f"step {t}")
        context = model.observe(context, obs[row], action[row], next_obs[row])


def test_context_tells_agents_apart(cartpole_data, vanilla):
    """A linear probe from the learned context to the push force holds on
    agents never seen in training, and the forward model predicts an agent
    better with its own context than with another's."""
    transitions, covariates = cartpole_data
    held_out, held_covariates = collect_random_actions("cartpole", jax.random.PRNGKey(3), 40, 60)
    probe = LinearRegression().fit(_agent_contexts(vanilla, transitions), covariates[:, 0])
    assert probe.score(_agent_contexts(vanilla, held_out), held_covariates[:, 0]) > 0.9

    # Held-out agents with the weakest and the strongest push: one-step error
    # of the strong one under its own context and under the weak one's.
    # (Among agents with 10 steps of 5 or more transitions of history.)
    data = cadm.pair_data(held_out, vanilla.config)
    order, _ = cadm.path_rows(held_out)
    agent = np.asarray(held_out.agent_id)[order]
    enough = np.asarray(data.history[:, 4] >= 0)
    usable = np.flatnonzero(np.bincount(agent[enough], minlength=held_out.num_agents) >= 10)
    weak = usable[np.argmin(held_covariates[usable, 0])]
    strong = usable[np.argmax(held_covariates[usable, 0])]
    assert held_covariates[strong, 0] > 2 * held_covariates[weak, 0]
    strong_rows = np.flatnonzero((agent == strong) & enough)
    weak_row = np.flatnonzero((agent == weak) & enough)[0]
    member = jax.tree.map(lambda leaf: leaf[0], vanilla.params["members"])
    bounds = (vanilla.params["max_logvar"], vanilla.params["min_logvar"])

    def error(context_rows):
        context = cadm.encode_context(member["encoder"],
                                      cadm.gather_history(data, jnp.asarray(context_rows)))
        mean, _ = cadm.forward_heads(member, bounds, vanilla.stats, data.obs[strong_rows],
                                     data.action[strong_rows], context)
        predicted = data.obs[strong_rows] + mean * vanilla.stats.delta_std + vanilla.stats.delta_mean
        return float(jnp.sqrt(jnp.mean((predicted - data.next_obs[strong_rows]) ** 2)))

    own = error(strong_rows)
    other = error(np.full_like(strong_rows, weak_row))
    assert own * 3 < other, (own, other)


def test_pe_ts_members_disagree_more_off_the_data(cartpole_data):
    transitions, _ = cartpole_data
    config = dataclasses.replace(SMALL, ensemble_size=3, probabilistic=True, particles=6,
                                 iterations=1, pairs_per_epoch=5_000)
    model = cadm.fit(transitions, config, key=jax.random.PRNGKey(1), progress=False)
    assert model.validation_loss.shape == (3,)
    dynamics = cadm.CaDMDynamics(model, for_planning=False)
    context = dynamics.init(jax.random.PRNGKey(0))
    for row in range(10):                       # agent 0's first transitions
        context = dynamics.observe(context, transitions.obs[row], transitions.action[row],
                                   transitions.next_obs[row])
    predict = dynamics.dynamics(context)
    on_data = jnp.asarray(transitions.obs[:200])
    action = jnp.asarray(transitions.action[:200])
    off_data = on_data * 10.0 + 1.0
    spread = lambda obs: float(jnp.mean(jnp.std(predict(obs, action), axis=0)))  # noqa: E731
    assert spread(off_data) > 3 * spread(on_data)

    # Planning: 6 particles, 2 per member, each a Gaussian draw; a function of
    # its inputs (the same call gives the same draw), different across particles.
    plan = cadm.CaDMDynamics(model, for_planning=True).dynamics(context)
    sampled = plan(on_data[:4], action[:4])
    assert sampled.shape == (6, 4, 4)
    np.testing.assert_array_equal(sampled, plan(on_data[:4], action[:4]))
    assert not np.allclose(sampled[0], sampled[1])

    # Particles are a planning setting: a run asking for 12 reuses this model
    # (the same training key) and plans it with 12, 4 per member.
    six, twelve = cadm.PETSCaDM(config), cadm.PETSCaDM(dataclasses.replace(config, particles=12))
    assert twelve.training_description() == six.training_description()
    assert twelve.description() != six.description()
    plan = twelve.dynamics_for_agent(model, [0])(0, None).dynamics(context)
    assert plan(on_data[:4], action[:4]).shape == (12, 4, 4)
    assert model.config.particles == 6


def test_vanilla_plans_on_its_prediction(cartpole_data, vanilla):
    """E = 1, P = 1, deterministic: the planner's dynamics is the prediction."""
    transitions, _ = cartpole_data
    model = cadm.CaDMDynamicsForAgent(vanilla, for_planning=True)(0, None)
    context = model.init(jax.random.PRNGKey(0))
    context = model.observe(context, transitions.obs[0], transitions.action[0],
                            transitions.next_obs[0])
    exact = cadm.CaDMDynamics(vanilla, for_planning=False).dynamics(context)
    obs, action = jnp.asarray(transitions.obs[:8]), jnp.asarray(transitions.action[:8])
    np.testing.assert_array_equal(model.dynamics(context)(obs, action), exact(obs, action))
    assert exact(obs, action).shape == (1, 8, 4)


@struct.dataclass
class _Counter:
    """A `ContextualDynamics` whose every prediction is the number of real
    transitions it has observed."""

    def init(self, key):
        return jnp.zeros((), jnp.float32)

    def observe(self, context, obs, action, next_obs):
        return context + 1.0

    def dynamics(self, context):
        return lambda obs, action: jnp.broadcast_to(context, (1, *obs.shape[-2:]))


@struct.dataclass
class _CounterForAgent:
    def __call__(self, row, covariates):
        return _Counter()


@struct.dataclass
class _PushLeft:
    def __call__(self, key, obs):
        return jnp.int32(0)


def test_prediction_protocol_freezes_the_context_after_the_warmup():
    env = envs.make("cartpole")
    result = evaluation.prediction_trajectories(
        jax.random.PRNGKey(0), _CounterForAgent(), env, _PushLeft(), env.test_agents[:1],
        warmup=10, horizon=5)
    # The last teacher-forced prediction saw the 9 transitions before it; the
    # open loop keeps that context.
    np.testing.assert_array_equal(result["predicted"][0], np.full((6, 4), 9.0))


def test_planner_config_is_cadms_objective():
    method = cadm.PETSCaDM()
    config = method.planner_config(planning.RandomShootingConfig(num_actions=2))
    assert (config.num_candidates, config.aggregation, config.discount,
            config.warm_start) == (200, "mean", 1.0, False)
    cem = method.planner_config(planning.CEMConfig(action_dim=6, num_samples=50, num_elites=10))
    assert (cem.num_samples, cem.num_elites, cem.init_std_low) == (50, 10, 0.5)
    icem = method.planner_config(planning.ICEMConfig(action_dim=6, num_samples=300,
                                                     init_std=0.2))
    assert (icem.num_samples, icem.init_std, icem.aggregation) == (200, 0.5, "mean")


def test_save_load_and_resume(small_mountaincar_data, tmp_path):
    transitions, _ = small_mountaincar_data
    key = jax.random.PRNGKey(4)
    straight = cadm.fit(transitions, TINY, key=key, progress=False)
    first = cadm.fit(transitions, dataclasses.replace(TINY, iterations=1), key=key,
                     checkpoint_dir=tmp_path / "ckpt", progress=False)
    resumed = cadm.fit(transitions, TINY, key=key, checkpoint_dir=tmp_path / "ckpt",
                       progress=False)
    assert not np.allclose(first.params["members"]["encoder"]["layer_0"]["w"],
                           straight.params["members"]["encoder"]["layer_0"]["w"])
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="different run"):
        cadm.fit(transitions, dataclasses.replace(TINY, back_coeff=0.1), key=key,
                 checkpoint_dir=tmp_path / "ckpt", progress=False)

    method = cadm.VanillaCaDM(TINY)
    path = tmp_path / "cadm.msgpack"
    method.save(straight, path)
    loaded = method.load(path)
    assert loaded.config == TINY and loaded.num_actions == transitions.num_actions
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not a CaDM"):
        cadm.CaDMModel.load(_write(tmp_path / "bad.msgpack"))


def _write(path):
    from flax import serialization

    path.write_bytes(serialization.msgpack_serialize({"format": "other"}))
    return path


def test_pe_ts_fits_and_plans_continuous_actions():
    """HalfCheetah's kind of actions (a box, raw in the history and the model
    input) without its physics: two agents whose next state moves by their own
    gain times the action; PE-TS fits them and CEM plans on its particles.
    (The HalfCheetah end to end in tests/test_run_halfcheetah.py runs PerSim
    only; its MJX programs cost minutes per extra method.)"""
    rng = np.random.default_rng(0)
    steps, obs_dim, action_dim = 60, 3, 2
    obs, action, next_obs, agent = [], [], [], []
    for a, gain in enumerate((0.5, -0.5)):
        state = rng.normal(size=obs_dim).astype(np.float32)
        for _ in range(steps):
            act = rng.uniform(-1, 1, action_dim).astype(np.float32)
            after = state + gain * np.pad(act, (0, obs_dim - action_dim))
            obs.append(state), action.append(act), next_obs.append(after), agent.append(a)
            state = after
    transitions = data.make_transitions(np.stack(obs), np.stack(action), np.stack(next_obs),
                                        np.asarray(agent, np.int32),
                                        reward=np.zeros(len(obs), np.float32))
    assert transitions.num_actions is None
    config = dataclasses.replace(cadm.PE_TS, iterations=1, epochs=1, pairs_per_epoch=512,
                                 hidden=(16,), encoder_hidden=(16,), batch_size=64)
    model = cadm.fit(transitions, config, key=jax.random.PRNGKey(0), progress=False)
    assert (model.num_actions, model.action_dim) == (None, action_dim)

    method = cadm.PETSCaDM(config)
    dynamics = method.dynamics_for_agent(model, np.arange(2))(0, None)
    context = dynamics.init(jax.random.PRNGKey(1))
    context = dynamics.observe(context, transitions.obs[0], transitions.action[0],
                               transitions.next_obs[0])
    step = dynamics.dynamics(context)
    states = jnp.asarray(transitions.obs[:4])
    low, high = step(states, -jnp.ones((4, action_dim))), step(states, jnp.ones((4, action_dim)))
    assert low.shape == (config.particles, 4, obs_dim), low.shape   # TS-∞: one member each
    assert np.all(np.isfinite(low)) and not np.allclose(low, high)   # the action enters

    planner_config = method.planner_config(planning.CEMConfig(
        action_dim=action_dim, num_samples=16, num_elites=4, horizon=3, num_rounds=1))
    planner = planning.cem(planner_config, lambda o, a, n: -jnp.sum(n ** 2, axis=-1),
                           lambda n: jnp.zeros(n.shape[:-1], bool))
    plan = jax.jit(lambda key, obs, context: planner.plan(key, planner.init(), obs,
                                                          dynamics.dynamics(context)))
    chosen, _ = plan(jax.random.PRNGKey(2), transitions.obs[0], context)
    assert chosen.shape == (action_dim,)
    assert np.all(np.abs(np.asarray(chosen)) <= 1.0)
