"""New agents added to a trained simulator in closed form (`Simulator.add_agents`,
`persim_jax.newcomers`): MountainCar's rank-3 dynamics (new gravities predicted
as well as the training agents', and their factors map to gravity), the closed
form against gradient descent on the same objective (discrete and continuous
actions, standardised and raw), old agents unchanged bit for bit, new patients
from a CSV file, and the validation errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from conftest import FIT_KEY
from experiments.datagen import datasets
from persim_jax import data
from persim_jax.persim import model
from persim_jax.persim.simulator import Simulator
from persim_jax.persim import newcomers, train

NUM_NEW = 20
NEW_STEPS = 100
FITTED = 20          # transitions per new agent given to add_agents

predict_mean = jax.jit(lambda sim, agent, obs, action: sim.predict(agent, obs, action).mean(0))


def first_steps(transitions, count):
    """Each agent's first `count` transitions (in logged order)."""
    ids = np.asarray(transitions.agent_id)
    position = np.concatenate([np.arange(c) for c in np.bincount(ids)])
    return transitions.select(position < count), transitions.select(position >= count)


def rmse(simulator, agent_ids, transitions):
    pred = np.asarray(predict_mean(simulator, jnp.asarray(agent_ids), transitions.obs,
                                   transitions.action))
    return float(np.sqrt(np.mean((pred - np.asarray(transitions.next_obs)) ** 2)))


@pytest.fixture(scope="module")
def newcomer_data():
    """(Transitions, gravities (K,)): 20 MountainCar gravities drawn uniformly
    from the paper's range (none of the test agents), NEW_STEPS random actions
    each, logged by the datasets' own collector."""
    env = envs.make("mountaincar")
    agents_key, run_key = jax.random.split(jax.random.PRNGKey(2024))
    low, high = env.covariate_ranges[0]
    covariates = np.asarray(jax.random.uniform(agents_key, (NUM_NEW, 1), minval=low,
                                               maxval=high))
    rollout = datasets.collect(env, covariates, run_key, epsilon=1.0, num_steps=NEW_STEPS)
    transitions = data.from_rollouts(
        rollout["obs"], rollout["action"], rollout["next_obs"], reward=rollout["reward"],
        done=rollout["terminated"], valid=rollout["valid"], num_actions=env.num_actions)
    return transitions, covariates[:, 0]


@pytest.fixture(scope="module")
def continuous_fit():
    """(Simulator, new Transitions): an untrained (randomly initialised)
    continuous-action simulator of 6 agents working in raw units (identity
    statistics, as standardize=False), and 3 new agents of a synthetic system
    with 3-d states and 2-d actions. The closed form and the bookkeeping do not
    need a trained network."""
    config = model.ModelConfig(num_agents=6, obs_dim=3, rank=2, action_dim=2,
                               state_hidden=(16,), action_hidden=(8,))
    params = jax.vmap(model.init_params, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(3), 2), config)
    simulator = Simulator(params=params, stats=model.identity_stats(3, 2),
                                validation_loss=jnp.array([0.01, 0.02]), config=config)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, 40, 3)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(3, 40, 2)).astype(np.float32)
    gains = rng.uniform(0.5, 1.5, 3)[:, None, None]
    next_obs = obs + 0.1 * gains * (action @ rng.normal(size=(2, 3)) + 0.5 * np.tanh(obs))
    return simulator, data.from_rollouts(obs, action, next_obs.astype(np.float32))


# ---------------------------------------------------------------------------
# MountainCar: exactly rank 3


def test_new_gravities_are_predicted_as_well_as_training_agents(mountaincar_data,
                                                                mountaincar_fit,
                                                                newcomer_data):
    transitions, _ = mountaincar_data
    simulator, _ = mountaincar_fit
    new, _ = newcomer_data
    fitted, later = first_steps(new, FITTED)
    bigger = simulator.add_agents(fitted)
    num_old = simulator.num_agents
    new_rmse = rmse(bigger, num_old + np.asarray(later.agent_id), later)
    _, held_out = train.validation_split(FIT_KEY, transitions.num_transitions, 0.2)
    held_out = transitions.select(held_out)
    old_rmse = rmse(simulator, np.asarray(held_out.agent_id), held_out)
    # The reference that the factor matters: every newcomer given the mean
    # training factor (no transitions) predicts far worse.
    mean_factor = simulator.add_agents(fitted, ridge=1e9)
    prior_rmse = rmse(mean_factor, num_old + np.asarray(later.agent_id), later)
    assert new_rmse < 1.5 * old_rmse, (new_rmse, old_rmse)
    assert prior_rmse > 3 * new_rmse, (prior_rmse, new_rmse)


def test_training_factors_map_to_the_new_agents_gravity(mountaincar_data, mountaincar_fit,
                                                        newcomer_data):
    _, covariates = mountaincar_data
    simulator, _ = mountaincar_fit
    new, gravity = newcomer_data
    fitted, _ = first_steps(new, FITTED)
    factors = np.asarray(simulator.agent_factors(member=None))                # (M, N, r)
    new_factors = np.asarray(newcomers.fit_factors(simulator, fitted))          # (M, K, r)
    assert new_factors.shape == (3, NUM_NEW, 3)
    for old, fresh in zip(factors, new_factors):
        coef, *_ = np.linalg.lstsq(np.c_[old, np.ones(len(old))], covariates[:, 0], rcond=None)
        residual = gravity - np.c_[fresh, np.ones(NUM_NEW)] @ coef
        r2 = 1 - residual.var() / gravity.var()
        assert r2 > 0.9, r2


# ---------------------------------------------------------------------------
# The closed form against gradient descent


def objective(factor, params, stats, config, obs, action, next_obs, mean, precision, ridge):
    """(1) of `newcomers` for one member and one agent's (T, ...) transitions,
    through the network's own forward pass: the factor put in an
    agent-encoder row."""
    encoder = params["agent_encoder"]
    params = {**params, "agent_encoder": {"kernel": (factor - encoder["bias"])[None],
                                          "bias": encoder["bias"]}}
    one = dataclasses.replace(config, num_agents=1)
    pred = model.apply(params, one, jnp.zeros(obs.shape[0], jnp.int32), stats.normalize_obs(obs),
                       stats.action_input(action, config.discrete))
    target = stats.normalize_delta(next_obs - obs)
    gap = factor - mean
    return jnp.sum((pred - target) ** 2) + ridge * gap @ precision @ gap


def gradient_descent(loss, start, steps=1500):
    """Nesterov's accelerated gradient descent for a strongly convex loss,
    step 1/L and momentum (√L − √μ)/(√L + √μ), L and μ the largest and
    smallest curvature at `start`."""
    curvatures = jnp.linalg.eigvalsh(jax.hessian(loss)(start))
    large, small = curvatures[-1], curvatures[0]
    momentum = (jnp.sqrt(large) - jnp.sqrt(small)) / (jnp.sqrt(large) + jnp.sqrt(small))
    grad = jax.grad(loss)

    def step(carry, _):
        x, previous = carry
        y = x + momentum * (x - previous)
        return (y - grad(y) / large, x), None

    return jax.lax.scan(step, (start, start), None, length=steps)[0][0]


@functools.partial(jax.jit, static_argnums=(0,))
def descend_all(config, params, stats, obs, action, next_obs, mean, precision, ridge):
    """(M, K, r) gradient-descent minimisers of every member and agent."""
    def one(params, mean, precision, obs, action, next_obs):
        loss = functools.partial(objective, params=params, stats=stats, config=config, obs=obs,
                                 action=action, next_obs=next_obs, mean=mean,
                                 precision=precision, ridge=ridge)
        return gradient_descent(lambda u: loss(u), mean), loss

    def member(params, mean, precision):
        return jax.vmap(lambda o, a, n: one(params, mean, precision, o, a, n)[0])(
            obs, action, next_obs)

    return jax.vmap(member)(params, mean, precision)


@pytest.mark.parametrize("kind", ["discrete_standardised", "continuous_raw"])
def test_closed_form_is_the_gradient_descent_minimiser(kind, mountaincar_fit, newcomer_data,
                                                       continuous_fit):
    if kind == "discrete_standardised":
        simulator, _ = mountaincar_fit
        new, _ = newcomer_data
        new, _ = first_steps(new, 5)
        new = new.select(np.asarray(new.agent_id) < 3).replace(num_agents=3)
        ridge = 0.05
    else:
        simulator, new = continuous_fit
        ridge = 0.3
    closed = np.asarray(newcomers.fit_factors(simulator, new, ridge=ridge))      # (M, K, r)
    # Every agent here has the same number of transitions: stack them (K, T, ...).
    order = np.argsort(np.asarray(new.agent_id), kind="stable")
    per_agent = lambda x: jnp.asarray(np.asarray(x)[order].reshape(new.num_agents, -1,
                                                                  *np.shape(x)[1:]))
    factors = np.asarray(simulator.agent_factors(member=None), np.float64)      # (M, N, r)
    precision = np.stack([np.linalg.inv(np.cov(f.T, bias=True)) for f in factors])
    descended = np.asarray(descend_all(
        simulator.config, simulator.params, simulator.stats, per_agent(new.obs),
        per_agent(new.action), per_agent(new.next_obs), jnp.asarray(factors.mean(1), jnp.float32),
        jnp.asarray(precision, jnp.float32), ridge))
    np.testing.assert_allclose(closed, descended, rtol=0, atol=1e-4 * np.abs(descended).max())


def test_one_transition_and_a_tiny_noise_variance_give_a_finite_factor(mountaincar_fit,
                                                                        newcomer_data):
    # One MountainCar transition: 2 equations for 3 unknowns, a singular
    # system that only the prior completes; with λ = 1e-12, float32 rounding
    # would decide the undetermined direction without RELATIVE_CURVATURE_CUTOFF
    # (NaN, or factors orders of magnitude outside the training factors).
    simulator, _ = mountaincar_fit
    new, _ = newcomer_data
    one, _ = first_steps(new, 1)
    fitted = np.asarray(newcomers.fit_factors(simulator, one, ridge=1e-12))       # (M, K, r)
    assert np.all(np.isfinite(fitted))
    for old, fresh in zip(np.asarray(simulator.agent_factors(member=None), np.float64), fitted):
        # Squared Mahalanobis distance to the training factors' distribution
        # (a training agent's is r on average).
        precision = np.linalg.inv(np.cov(old.T, bias=True))
        gap = fresh - old.mean(0)
        assert np.einsum("kr,rs,ks->k", gap, precision, gap).max() < 1e4


# ---------------------------------------------------------------------------
# Old agents, indexing, files


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_old_agents_unchanged_and_new_ones_appended(kind, mountaincar_fit, newcomer_data,
                                                    continuous_fit):
    if kind == "discrete":
        simulator, _ = mountaincar_fit
        new, _ = newcomer_data
        new, _ = first_steps(new, FITTED)
    else:
        simulator, new = continuous_fit
    bigger = simulator.add_agents(new)
    n, k = simulator.num_agents, new.num_agents
    assert bigger.num_agents == n + k and bigger.config.num_agents == n + k
    old_ids = np.arange(n)
    obs = np.repeat(np.asarray(new.obs[:1]), n, axis=0)
    action = np.repeat(np.asarray(new.action[:1]), n, axis=0)
    before = np.asarray(jax.jit(simulator.predict)(old_ids, obs, action))
    after = np.asarray(jax.jit(bigger.predict)(old_ids, obs, action))
    assert np.array_equal(before, after)
    old_factors = np.asarray(simulator.agent_factors(member=None))
    assert np.array_equal(np.asarray(bigger.agent_factors(member=None))[:, :n], old_factors)
    fitted = np.asarray(newcomers.fit_factors(simulator, new))
    np.testing.assert_allclose(np.asarray(bigger.agent_factors(member=None))[:, n:], fitted,
                               rtol=1e-5, atol=1e-6)
    # A saved and reloaded bigger simulator is the same model.
    reloaded = Simulator.from_bytes(bigger.to_bytes())
    assert reloaded.num_agents == n + k
    assert np.array_equal(np.asarray(reloaded.predict(n + k - 1, obs[0], action[0])),
                          np.asarray(bigger.predict(n + k - 1, obs[0], action[0])))


def test_new_patients_from_a_csv_file(tmp_path, mountaincar_fit, newcomer_data):
    simulator, _ = mountaincar_fit
    new, _ = newcomer_data
    new, _ = first_steps(new, 10)
    new = new.select(np.asarray(new.agent_id) < 3).replace(num_agents=3)
    labelled = new.replace(agent_keys=("p-07", "p-11", "p-42"))
    path = tmp_path / "new_patients.csv"
    data.save_csv(path, labelled)
    loaded = data.load_csv(path, map_agent_ids=True, num_actions=3)
    bigger = simulator.add_agents(loaded)
    n = simulator.num_agents
    assert bigger.agent_keys == (*range(n), "p-07", "p-11", "p-42")
    assert bigger.agent_index("p-11") == n + 1
    direct = simulator.add_agents(new)
    np.testing.assert_allclose(np.asarray(bigger.agent_factors(None)),
                               np.asarray(direct.agent_factors(None)), rtol=1e-6, atol=1e-7)
    # Keys already taken are refused, naming them.
    with pytest.raises(ValueError, match="agent_keys.*already"):
        bigger.add_agents(loaded)


# ---------------------------------------------------------------------------
# Bad input


def _bad_inputs(new):
    obs = np.asarray(new.obs)
    nan_obs = obs.copy()
    nan_obs[3, 1] = np.nan
    action = np.asarray(new.action).copy()
    action[2] = 3
    return {
        "state dimension": (new.replace(obs=np.c_[obs, obs[:, :1]],
                                        next_obs=np.c_[new.next_obs, obs[:, :1]]),
                            "3 dimensions.*2-dimensional"),
        "nan": (new.replace(obs=nan_obs), "new agents.*obs.*(NaN|nan|finite)"),
        "action out of range": (new.replace(action=action, num_actions=4),
                                "row 2 has action 3.*0..2"),
        "agent without transitions": (new.replace(num_agents=new.num_agents + 1),
                                      f"agent {new.num_agents} has no transitions"),
        "no transitions": (new.select(np.zeros(new.num_transitions, bool)), "no transitions"),
        "continuous actions": (new.replace(action=np.zeros((new.num_transitions, 1), np.float32),
                                           num_actions=None), "continuous actions.*discrete"),
    }


@pytest.mark.parametrize("problem", ["state dimension", "nan", "action out of range",
                                     "agent without transitions", "no transitions",
                                     "continuous actions"])
def test_bad_input_raises_a_clear_error(problem, mountaincar_fit, newcomer_data):
    simulator, _ = mountaincar_fit
    new, _ = newcomer_data
    new, _ = first_steps(new, 5)
    transitions, message = _bad_inputs(new)[problem]
    with pytest.raises(ValueError, match=message):
        simulator.add_agents(transitions)


def test_bad_ridge_and_continuous_action_size(continuous_fit):
    simulator, new = continuous_fit
    for ridge in (0.0, -1.0, float("nan"), [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match="ridge"):
            simulator.add_agents(new, ridge=ridge)
    wider = new.replace(action=np.c_[new.action, new.action[:, :1]])
    with pytest.raises(ValueError, match="3 dimensions.*takes 2"):
        simulator.add_agents(wider)
