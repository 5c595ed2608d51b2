"""Planners: scores against a plain-Python reference, toy problems with a known
optimum (CEM and random shooting), the pessimistic min over members, blown-up
predictions, the Simulator dynamics against `Simulator.predict`, and the
true-env dynamics against the env's own step."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from experiments import paper
from persim_jax import planning
from persim_jax.persim import model
from persim_jax.persim.model import ModelConfig, NormStats
from persim_jax.persim.simulator import Simulator


# ---------------------------------------------------------------------------
# Toy problems: a 1-D integrator s' = s + step(a) with a quadratic reward.

def integrator(step_of_action, members=1):
    """Dynamics contract for s' = s + step(a), D = 1, M identical members."""

    def dynamics(obs, action):
        step = step_of_action(action)[..., None]
        if obs.ndim == 2:
            obs = jnp.broadcast_to(obs, (members, *obs.shape))
        return obs + step

    return dynamics


def quadratic_reward(obs, action, next_obs):
    return -jnp.square(next_obs[..., 0])


DISCRETE_STEPS = jnp.array([-0.25, 0.0, 0.25])


@pytest.mark.parametrize("num_actions, propagation, rollout_chunk", [
    (None, "members", None),
    (3, "members", None),          # 3: the first steps on the tree of action prefixes
    (3, "members", 24),            # 64 candidates in 3 chunks of 22 (2 padded)
    (3, "ensemble_mean", None)])
def test_member_returns_match_a_python_loop(num_actions, propagation, rollout_chunk):
    # Two members with different drifts; termination at |s| > 0.95; bonus on s.
    drift = np.array([0.1, -0.3])

    def dynamics(obs, action):
        step = (action.astype(jnp.float32) - 1.0) * 0.4
        if obs.ndim == 2:
            obs = jnp.broadcast_to(obs, (2, *obs.shape))
        return obs + step[None, :, None] + jnp.asarray(drift, jnp.float32)[:, None, None]

    def reward(obs, action, next_obs):
        return next_obs[..., 0] - 0.5 * obs[..., 0]

    def terminated(next_obs):     # states are multiples of 0.1 (members): no ties at 0.95
        return jnp.abs(next_obs[..., 0]) > 0.95

    rng = np.random.default_rng(0)
    actions = rng.integers(0, 3, size=(64, 8))
    s0, gamma, bonus = 0.2, 0.9, 0.05
    got = np.asarray(planning.member_returns(
        dynamics, reward, terminated, jnp.array([s0]), jnp.asarray(actions), discount=gamma,
        propagation=propagation, position_bonus=bonus, num_actions=num_actions,
        rollout_chunk=rollout_chunk))
    expected = np.zeros((2, 64))
    for b in range(64):
        fed = np.array([s0, s0])
        alive, total, best = np.ones(2, bool), np.zeros(2), np.array([s0, s0])
        for t, a in enumerate(actions[b]):
            predicted = fed + (a - 1.0) * 0.4 + drift
            for m in range(2):
                if alive[m]:
                    best[m] = max(best[m], predicted[m])
                    if abs(predicted[m]) > 0.95:    # the terminating step earns nothing
                        alive[m] = False
                    else:
                        total[m] += gamma ** t * (predicted[m] - 0.5 * fed[m])
            fed = predicted if propagation == "members" else np.full(2, predicted.mean())
        expected[:, b] = total + bonus * len(actions[b]) * best
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_random_shooting_finds_the_optimum_of_a_small_problem():
    # Horizon 4, 3 actions: 81 sequences; 2000 uniform candidates cover them
    # all (P(miss one) < 1e-9), so the plan must be a best sequence.
    config = planning.RandomShootingConfig(num_actions=3, num_candidates=2000, horizon=4,
                                           discount=0.9)
    planner = planning.random_shooting(config, quadratic_reward)
    dynamics = integrator(lambda a: DISCRETE_STEPS[a])
    s0 = 0.6
    scores = {}
    for seq in itertools.product(range(3), repeat=4):
        s, total = s0, 0.0
        for t, a in enumerate(seq):
            s = s + float(DISCRETE_STEPS[a])
            total += -(0.9 ** t) * s * s
        scores[seq] = total
    best = max(scores.values())
    action, state = jax.jit(planner.plan, static_argnums=3)(
        jax.random.PRNGKey(0), planner.init(), jnp.array([s0]), dynamics)
    plan = tuple(int(a) for a in state.previous_plan)
    assert scores[plan] == pytest.approx(best, abs=1e-6)
    assert int(action) == plan[0] == 0      # two steps of -0.25 then stay
    assert bool(state.has_previous)


def test_random_shooting_warm_start_is_the_shifted_previous_plan():
    # One candidate: with a warm start it can only be the previous plan shifted.
    config = planning.RandomShootingConfig(num_actions=3, num_candidates=1, horizon=5)
    planner = planning.random_shooting(config, quadratic_reward)
    previous = jnp.array([2, 0, 1, 2, 0], jnp.int32)
    state = planning.RandomShootingState(previous, jnp.array(True))
    action, state = planner.plan(jax.random.PRNGKey(3), state, jnp.array([0.0]),
                                 integrator(lambda a: DISCRETE_STEPS[a]))
    assert int(action) == 0
    np.testing.assert_array_equal(np.asarray(state.previous_plan[:4]), [0, 1, 2, 0])


def test_cem_approaches_the_optimal_sequence_of_an_integrator():
    # From s0 = 0.5 the unique optimum is a_0 = -0.5, then a_t = 0.
    config = planning.CEMConfig(action_dim=1, horizon=10)
    planner = planning.cem(config, quadratic_reward)
    dynamics = integrator(lambda a: a[..., 0])
    plan = jax.jit(planner.plan, static_argnums=3)
    action, state = plan(jax.random.PRNGKey(0), planner.init(), jnp.array([0.5]), dynamics)
    assert float(action[0]) == pytest.approx(-0.5, abs=0.08)
    # The smoothed mean (shifted by one step) is near the optimum's tail, 0.
    assert np.max(np.abs(np.asarray(state.mean[:5]))) < 0.15
    # MPC: a few steps from the true state drive it to 0 and keep it there.
    obs = jnp.array([0.5])
    for i in range(5):
        action, state = plan(jax.random.PRNGKey(i + 1), state, obs, dynamics)
        obs = obs + action
    assert abs(float(obs[0])) < 0.05


def test_cem_samples_stay_in_the_box():
    # The optimum lies outside the box: the plan sits on its edge, not beyond.
    config = planning.CEMConfig(action_dim=2, horizon=5, num_samples=64, num_elites=8,
                                action_low=-0.3, action_high=0.7)
    planner = planning.cem(config, lambda o, a, n: jnp.sum(a, axis=-1))
    dynamics = integrator(lambda a: a[..., 0])
    action, state = planner.plan(jax.random.PRNGKey(1), planner.init(), jnp.array([0.0]),
                                 dynamics)
    assert np.all(np.asarray(action) <= 0.7) and np.all(np.asarray(action) > 0.45)
    assert np.all(np.asarray(state.mean) <= 0.7) and np.all(np.asarray(state.mean) >= -0.3)


# ---------------------------------------------------------------------------
# Pessimism over the ensemble and blown-up predictions

def two_member_gamble(obs, action):
    """State (value, wrecked). Action 0 is safe (+0.3), action 1 risky (+1);
    member 1 predicts that the risky action wrecks (terminates) the system."""
    if obs.ndim == 2:
        obs = jnp.broadcast_to(obs, (2, *obs.shape))
    risky = action == 1
    value = obs[..., 0] + jnp.where(risky, 1.0, 0.3)
    wrecked = jnp.stack([obs[0, :, 1], jnp.where(risky, 1.0, obs[1, :, 1])])
    return jnp.stack([value, wrecked], axis=-1)


def gain(obs, action, next_obs):
    return next_obs[..., 0] - obs[..., 0]


def wrecked(next_obs):
    return next_obs[..., 1] > 0.5


@pytest.mark.parametrize("aggregation, expected_action", [("min", 0), ("mean", 1)])
def test_min_over_members_avoids_what_one_member_calls_a_disaster(aggregation, expected_action):
    config = planning.RandomShootingConfig(num_actions=2, num_candidates=256, horizon=10,
                                           aggregation=aggregation)
    planner = planning.random_shooting(config, gain, wrecked)
    plan = jax.jit(planner.plan, static_argnums=3)
    state, obs = planner.init(), jnp.zeros(2)
    for i in range(3):
        action, state = plan(jax.random.PRNGKey(i), state, obs, two_member_gamble)
        # min: the safe action every time; mean: the optimistic average gambles.
        assert int(action) == expected_action


def test_cem_min_over_members_stays_below_the_cliff():
    # Reward a; member 1 says any a > 0.2 is fatal. Pessimism keeps a <= 0.2.
    def dynamics(obs, action):
        if obs.ndim == 2:
            obs = jnp.broadcast_to(obs, (2, *obs.shape))
        fell = jnp.stack([obs[0, :, 1], jnp.where(action[:, 0] > 0.2, 1.0, obs[1, :, 1])])
        return jnp.stack([obs[..., 0] + action[None, :, 0], fell], axis=-1)

    config = planning.CEMConfig(action_dim=1, horizon=5, num_samples=100, num_elites=20)
    planner = planning.cem(config, gain, wrecked)
    action, _ = planner.plan(jax.random.PRNGKey(0), planner.init(), jnp.zeros(2), dynamics)
    assert 0.0 < float(action[0]) <= 0.2


def test_nan_predictions_never_win_and_the_action_is_finite():
    # Action 2 would be best (+0.25 toward 0 from -0.6) but blows up.
    def dynamics(obs, action):
        next_obs = integrator(lambda a: DISCRETE_STEPS[a])(obs, action)
        return jnp.where((action == 2)[None, :, None], jnp.nan, next_obs)

    config = planning.RandomShootingConfig(num_actions=3, num_candidates=200, horizon=6)
    planner = planning.random_shooting(config, quadratic_reward)
    action, state = planner.plan(jax.random.PRNGKey(0), planner.init(), jnp.array([-0.6]),
                                 dynamics)
    assert int(action) == 1 and 2 not in np.asarray(state.previous_plan)

    # Everything NaN (here the current state itself): still a valid action.
    nan_everywhere = lambda obs, action: jnp.full((1, action.shape[0], 1), jnp.nan)
    action, _ = planner.plan(jax.random.PRNGKey(1), planner.init(), jnp.array([jnp.nan]),
                             nan_everywhere)
    assert 0 <= int(action) < 3

    # CEM: inf for positive first actions, which the reward would prefer.
    def exploding(obs, action):
        next_obs = integrator(lambda a: a[..., 0])(obs, action)
        return jnp.where((action[:, 0] > 0)[None, :, None], jnp.inf, next_obs)

    cem_config = planning.CEMConfig(action_dim=1, horizon=4, num_samples=64, num_elites=8)
    reward_up = lambda o, a, n: n[..., 0]
    planner = planning.cem(cem_config, reward_up)
    action, state = planner.plan(jax.random.PRNGKey(2), planner.init(), jnp.array([0.0]),
                                 exploding)
    assert np.all(np.isfinite(np.asarray(action))) and float(action[0]) <= 0.0
    planner = planning.cem(cem_config, reward_up)
    nan_cem = lambda obs, action: jnp.full((1, action.shape[0], 1), jnp.nan)
    action, state = planner.plan(jax.random.PRNGKey(3), planner.init(), jnp.array([0.0]), nan_cem)
    assert np.all(np.isfinite(np.asarray(action))) and np.all(np.abs(np.asarray(action)) <= 1)
    assert np.all(np.isfinite(np.asarray(state.mean)))


# ---------------------------------------------------------------------------
# Dynamics of a learned Simulator and of the true env

def random_simulator(discrete: bool, num_agents=6, members=3) -> Simulator:
    if discrete:
        config = ModelConfig(num_agents=num_agents, obs_dim=4, rank=5, num_actions=2,
                             state_hidden=(32,))
        action_stats = (jnp.zeros((0,)), jnp.ones((0,)))
    else:
        config = ModelConfig(num_agents=num_agents, obs_dim=5, rank=4, action_dim=3,
                             state_hidden=(16, 16), action_hidden=(8,))
        action_stats = (jnp.array([0.1, -0.2, 0.0]), jnp.array([0.5, 2.0, 1.0]))
    keys = jax.random.split(jax.random.PRNGKey(4), members)
    params = jax.vmap(model.init_params, in_axes=(0, None))(keys, config)
    dim = config.obs_dim
    stats = NormStats(jnp.linspace(-0.5, 0.5, dim), jnp.linspace(0.5, 2.0, dim),
                      jnp.linspace(-0.1, 0.1, dim), jnp.linspace(0.05, 0.2, dim), *action_stats)
    return Simulator(params=params, stats=stats, validation_loss=jnp.zeros(members),
                     config=config)


@pytest.mark.parametrize("discrete", [True, False])
def test_simulator_dynamics_equal_predict_and_predict_members(discrete):
    simulator = random_simulator(discrete)
    dim = simulator.obs_dim
    obs = jax.random.normal(jax.random.PRNGKey(0), (7, dim))
    member_obs = jax.random.normal(jax.random.PRNGKey(1), (3, 7, dim))
    if discrete:
        action = jax.random.randint(jax.random.PRNGKey(2), (7,), 0, 2)
    else:
        action = jax.random.uniform(jax.random.PRNGKey(2), (7, 3), minval=-1, maxval=1)

    @jax.jit
    @jax.vmap
    def both(agent):           # vmapped over agents, as in run_episodes
        dynamics = planning.simulator_dynamics(simulator, agent)
        return dynamics(obs, action), dynamics(member_obs, action)

    shared, own = both(jnp.array([0, 4]))
    for i, agent in enumerate([0, 4]):
        np.testing.assert_allclose(shared[i], simulator.predict(agent, obs, action),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(own[i], simulator.predict_members(agent, member_obs, action),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mountaincar", "cartpole"])
def test_true_env_dynamics_equal_the_env_step(name):
    env = envs.make(name)
    params = env.agent_params(env.test_agents[1])
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    obs, state = jax.vmap(env.reset, in_axes=(0, None))(keys, params)
    # Move away from the reset distribution first.
    for i in range(5):
        action = jnp.arange(16) % env.num_actions
        obs, state, _, _, _ = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))(
            keys, state, action, params)
    action = (jnp.arange(16) + 1) % env.num_actions
    expected, _, _, _, _ = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))(
        keys, state, action, params)
    dynamics = planning.env_dynamics(env, params)
    got = jax.jit(dynamics)(obs, action)
    assert got.shape == (1, 16, env.obs_dim)
    # Equal up to float32 rounding (XLA fuses the two programs differently).
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(expected), rtol=1e-6, atol=1e-7)
    # The per-member form (1, B, D) is the same step.
    np.testing.assert_array_equal(np.asarray(jax.jit(dynamics)(got, action)),
                                  np.asarray(jax.jit(dynamics)(got[0], action)))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="aggregation"):
        planning.RandomShootingConfig(num_actions=2, aggregation="max")
    with pytest.raises(ValueError, match="num_elites"):
        planning.CEMConfig(action_dim=1, num_samples=10, num_elites=20)
    with pytest.raises(ValueError, match="discount"):
        planning.CEMConfig(action_dim=1, discount=0.0)
    with pytest.raises(ValueError, match="horizon"):
        planning.RandomShootingConfig(num_actions=2, horizon=0)
    with pytest.raises(ValueError, match="shard_candidates"):
        planning.CEMConfig(action_dim=1, shard_candidates="yes")
    with pytest.raises(ValueError, match="config"):
        planning.cem(planning.RandomShootingConfig(num_actions=2), quadratic_reward)


def test_paper_configs_follow_the_decisions_table():
    cartpole = paper.planner_config(envs.make("cartpole"))
    assert (cartpole.num_candidates, cartpole.horizon, cartpole.discount, cartpole.aggregation,
            cartpole.position_bonus) == (1000, 30, 0.93, "min", 0.0)
    mountaincar = paper.planner_config(envs.make("mountaincar"))
    assert (mountaincar.num_candidates, mountaincar.horizon, mountaincar.position_bonus) == (
        1000, 50, 0.01)
    authors = paper.planner_config(envs.make("cartpole"), aggregation="mean", discount=1.0)
    assert (authors.aggregation, authors.discount) == ("mean", 1.0)


# ---------------------------------------------------------------------------
# iCEM


def test_colored_noise_has_unit_variance_and_its_colour():
    for beta, low, high in ((0.0, -0.05, 0.05), (2.5, 0.85, 1.0)):
        noise = planning.colored_noise(jax.random.PRNGKey(0), beta, (4000, 30))
        assert float(jnp.std(noise)) == pytest.approx(1.0, abs=0.03)
        lag1 = float(jnp.mean(noise[:, 1:] * noise[:, :-1]))       # autocorrelation at lag 1
        assert low < lag1 < high, (beta, lag1)


def test_icem_config_sizes_and_validation():
    config = planning.ICEMConfig(action_dim=6, num_samples=100, num_elites=10, num_rounds=3,
                                 decay=1.25, keep_elites=0.3)
    assert config.population() == (100, 80, 64, 51)
    assert config.sequences_per_plan() == 100 + 80 + 64 + 51 + 4 * 3 + 1
    with pytest.raises(ValueError, match="decay"):
        planning.ICEMConfig(action_dim=1, decay=0.5)
    with pytest.raises(ValueError, match="keep_elites"):
        planning.ICEMConfig(action_dim=1, keep_elites=1.5)
    with pytest.raises(ValueError, match="execute"):
        planning.ICEMConfig(action_dim=1, execute="first")


def test_icem_approaches_the_optimal_sequence_of_an_integrator():
    # The integrator of the CEM test: from s0 = 0.5 the optimum is a_0 = -0.5, then 0.
    # White noise (β = 0): the optimum is a step, which smooth red noise
    # samples poorly.
    config = planning.ICEMConfig(action_dim=1, horizon=10, num_samples=64, num_elites=8,
                                 num_rounds=5, beta=0.0)
    planner = planning.icem(config, quadratic_reward)
    dynamics = integrator(lambda a: a[..., 0])
    sequence = jax.jit(planner.sequence, static_argnums=3)
    best, state = sequence(jax.random.PRNGKey(0), planner.init(), jnp.array([0.5]), dynamics)
    assert float(best[0, 0]) == pytest.approx(-0.5, abs=0.08)
    assert bool(state.has_elites) and state.elites.shape == (2, 10, 1)
    # The carried elites are shifted by one step: their last step is zero.
    np.testing.assert_array_equal(np.asarray(state.elites[:, -1]), 0.0)
    # MPC from the true state drives it to 0 (`plan` plays the sequence's
    # first action; the compiled `sequence` is reused).
    obs = jnp.array([0.5])
    for i in range(5):
        best, state = sequence(jax.random.PRNGKey(i + 1), state, obs, dynamics)
        assert np.all(np.abs(np.asarray(best)) <= 1.0)
        obs = obs + best[0]
    assert abs(float(obs[0])) < 0.05


def test_icem_keeps_the_best_sequence_and_stays_in_the_box():
    config = planning.ICEMConfig(action_dim=2, horizon=5, num_samples=32, num_elites=4,
                                 action_low=-0.3, action_high=0.7)
    def planner_reward(obs, action, next_obs):
        return jnp.sum(action, axis=-1)

    planner = planning.make_planner(config, type("Env", (), {
        "reward": staticmethod(planner_reward),
        "terminated": staticmethod(lambda n: jnp.zeros(n.shape[:-1], bool))})())
    dynamics = integrator(lambda a: a[..., 0])
    sequence = jax.jit(planner.sequence, static_argnums=3)
    best, _ = sequence(jax.random.PRNGKey(1), planner.init(), jnp.array([0.0]), dynamics)
    assert np.all(np.asarray(best) <= 0.7) and np.all(np.asarray(best) >= -0.3)
    assert float(np.mean(np.asarray(best))) > 0.5         # the optimum: 0.7 everywhere
    # execute="mean" plays the final mean: the state's mean before its shift.
    mean_planner = planning.icem(dataclasses.replace(config, execute="mean"), planner_reward,
                                 None)
    played, state = jax.jit(mean_planner.sequence, static_argnums=3)(
        jax.random.PRNGKey(1), mean_planner.init(), jnp.array([0.0]), dynamics)
    np.testing.assert_allclose(np.asarray(played[1:]), np.asarray(state.mean[:-1]))
    assert np.all(np.asarray(played) <= 0.7) and float(np.mean(np.asarray(played))) > 0.3
