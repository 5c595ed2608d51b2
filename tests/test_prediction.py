"""The open-loop prediction-error protocol (`evaluation.prediction_error`,
docs/authors-code.md 5.2).

Several tests use `TrueDynamics`, a simulator-like pytree whose members step
the true env (plus a per-member offset): with zero offset every prediction is
exact, so any misalignment of states, actions or warm-up shows as an error.
The exact metric checks rely on `prediction_trajectories(key, ...)` playing
episode 0 of `prediction_error(key, ...)` (both derive episode e of row a
from fold_in(fold_in(key, a), e)), and recompute that episode's RMSE and R²
with numpy and sklearn.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from sklearn.metrics import r2_score

import envs
from experiments.datagen import policies
from persim_jax import dynamics, evaluation
from persim_jax.evaluation import prediction
from persim_jax.persim.model import ModelConfig


@struct.dataclass
class TrueDynamics:
    """Members step the true env of agent n (covariates[n]) and add bias[m]."""

    covariates: jax.Array          # (N, P)
    bias: jax.Array                # (M, D)
    env: Any = struct.field(pytree_node=False)
    config: ModelConfig = struct.field(pytree_node=False)

    @property
    def num_agents(self):
        return self.covariates.shape[0]

    @property
    def obs_dim(self):
        return self.config.obs_dim

    @property
    def ensemble_size(self):
        return self.bias.shape[0]

    def predict(self, agent_id, obs, action):
        """obs (B, D), action (B,) -> (M, B, D), as `Simulator.predict`."""
        return self.predict_members(
            agent_id, jnp.broadcast_to(obs, (self.ensemble_size, *obs.shape)), action)

    def predict_members(self, agent_id, obs, action):
        """obs (M, B, D), action (B,) -> (M, B, D), as `Simulator.predict_members`."""
        params = self.env.covariates_to_params(self.covariates[agent_id])

        def one(o, a):
            state = self.env.state_from_obs(o)
            return self.env.step_env(jax.random.PRNGKey(0), state, a, params)[0]

        members = jax.vmap(lambda o: jax.vmap(one)(o, action))(obs)
        return members.astype(jnp.float32) + self.bias[:, None]


def true_dynamics(env, covariates, bias, agent_ids=None):
    """The dynamics_for_agent of a `TrueDynamics` ensemble, row i -> agent_ids[i]
    (default agent i), as the protocol runs a Simulator."""
    bias = jnp.asarray(bias, jnp.float32)
    config = ModelConfig(num_agents=len(covariates), obs_dim=env.obs_dim, rank=1,
                         num_actions=env.num_actions)
    ensemble = TrueDynamics(jnp.asarray(covariates, jnp.float32), bias, env, config)
    return dynamics.simulator_dynamics_for_agent(ensemble, agent_ids, fold=False)


def reference_metrics(true, predicted, valid):
    """RMSE and sklearn's variance-weighted R² of one window, valid rows only."""
    t, p = np.asarray(true, np.float64)[valid], np.asarray(predicted, np.float64)[valid]
    if len(t) == 0:
        return np.nan, np.nan
    rmse = np.sqrt(np.mean((p - t) ** 2))
    if len(t) < 2 or np.sum((t - t.mean(0)) ** 2) == 0:
        return rmse, np.nan
    return rmse, r2_score(t, p, multioutput="variance_weighted")


@pytest.fixture(scope="module")
def mountaincar():
    env = envs.make("mountaincar")
    return env, policies.test_policy(env)


@pytest.fixture(scope="module")
def cartpole():
    env = envs.make("cartpole")
    return env, policies.test_policy(env)


def test_exact_simulator_has_zero_error(mountaincar):
    env, policy = mountaincar
    sim = true_dynamics(env, env.test_agents, np.zeros((2, 2)))
    err = evaluation.prediction_error(jax.random.PRNGKey(0), sim, env, policy, env.test_agents,
                                      num_episodes=3)
    assert err.rmse.shape == err.r2.shape == (5, 3)
    np.testing.assert_array_less(err.rmse, 1e-5)
    np.testing.assert_allclose(err.r2, 1.0, atol=1e-5)
    # The true physics of another agent is a wrong model: agent_ids are used.
    other = true_dynamics(env, env.test_agents, np.zeros((2, 2)), agent_ids=[4, 3, 2, 1, 0])
    wrong = evaluation.prediction_error(jax.random.PRNGKey(0), other, env, policy,
                                        env.test_agents, num_episodes=3)
    assert np.all(wrong.rmse[[0, 1, 3, 4]] > 1e-3)


def test_trained_mountaincar_simulator_predicts_the_test_agents(mountaincar, mountaincar_fit):
    env, policy = mountaincar
    simulator, _ = mountaincar_fit      # units 0..4 of its data are the test agents
    key = jax.random.PRNGKey(3)
    err = evaluation.prediction_error(key, simulator, env, policy, env.test_agents,
                                      num_episodes=4)
    assert np.all(np.isfinite(err.rmse)) and np.all(np.isfinite(err.r2))
    assert np.median(err.rmse) < 0.03           # positions span 1.8, velocities 0.14
    assert np.median(err.r2) > 0.95
    summary = err.summary()
    assert set(summary) == {"rmse", "rmse_std", "r2_mean", "r2_median"}
    assert all(len(v) == 5 and all(isinstance(x, float) for x in v) for v in summary.values())
    np.testing.assert_allclose(summary["rmse"], err.rmse.mean(1))
    np.testing.assert_allclose(summary["rmse_std"], err.rmse.std(1))
    np.testing.assert_allclose(summary["r2_median"], np.median(err.r2, 1))
    # An untrained network of the same shapes is far worse.
    untrained = simulator.replace(params=jax.tree.map(lambda x: 0.3 * x[::-1], simulator.params))
    bad = evaluation.prediction_error(key, untrained, env, policy, env.test_agents,
                                      num_episodes=4)
    assert np.median(bad.rmse) > 5 * np.median(err.rmse)


def test_metrics_and_open_loop_match_a_recomputation(mountaincar, mountaincar_fit):
    env, policy = mountaincar
    simulator, _ = mountaincar_fit
    key, agents, ids = jax.random.PRNGKey(5), env.test_agents[[1, 3]], [1, 3]
    policy = policies.test_policy(env, epsilon=0.0)
    kw = dict(warmup=4, horizon=12)
    traj = evaluation.prediction_trajectories(key, simulator, env, policy, agents, ids, **kw)
    assert traj["true"].shape == traj["predicted"].shape == (2, 13, 2)
    assert traj["members"].shape == (2, 3, 13, 2) and traj["valid"].shape == (2, 13)
    np.testing.assert_allclose(traj["predicted"], traj["members"].mean(1), rtol=1e-6)

    err = evaluation.prediction_error(key, simulator, env, policy, agents, ids, num_episodes=3,
                                      **kw)
    for a in range(2):
        rmse, r2 = reference_metrics(traj["true"][a], traj["predicted"][a], traj["valid"][a])
        np.testing.assert_allclose(err.rmse[a, 0], rmse, rtol=1e-4)
        np.testing.assert_allclose(err.r2[a, 0], r2, rtol=1e-4)
    assert np.all(err.rmse[:, 1:] != err.rmse[:, :1])      # other episodes differ

    # The window: state `warmup` predicted in one step from the true state
    # warmup - 1 (the same episode played with one warm-up step less), then
    # each member's own open loop under the policy's actions (ε = 0).
    earlier = evaluation.prediction_trajectories(key, simulator, env, policy, agents, ids,
                                                 warmup=3, horizon=13)
    np.testing.assert_allclose(earlier["true"][:, 1:], traj["true"], rtol=1e-6)
    for a in range(2):
        previous = earlier["true"][a, 0]
        action = policies.greedy_action(env, policy.params, jnp.asarray(previous))
        first = simulator.predict(ids[a], previous, action)
        np.testing.assert_allclose(traj["members"][a, :, 0], first, rtol=1e-5, atol=1e-7)
        actions = policies.greedy_action(env, policy.params, jnp.asarray(traj["true"][a, :-1]))
        steps = simulator.predict_members(ids[a], traj["members"][a, :, :-1], actions)
        np.testing.assert_allclose(traj["members"][a, :, 1:], steps, rtol=1e-5, atol=1e-7)
    # ... whereas `earlier` runs open loop from there: not the same predictions.
    assert not np.allclose(earlier["members"][:, :, 1], traj["members"][:, :, 0], atol=1e-7)


def test_states_after_termination_are_not_scored(cartpole):
    env, _ = cartpole
    # An untrained network drops the pole quickly.
    policy = policies.EpsilonGreedyPolicy(policies.init_policy(env, jax.random.PRNGKey(0)),
                                          jnp.float32(0.01), env)
    agents = np.array([[2.0, 0.5], [18.0, 0.15]])
    sim = true_dynamics(env, agents, [[0.01, 0.0, 0.02, 0.0], [0.0, -0.02, 0.0, 0.01]])
    key, kw = jax.random.PRNGKey(2), dict(warmup=3, horizon=40)
    traj = evaluation.prediction_trajectories(key, sim, env, policy, agents, **kw)
    valid = traj["valid"]
    assert np.all(valid[:, 0]) and not np.all(valid)               # ended inside the window
    assert np.all(valid[:, :-1] >= valid[:, 1:])                   # a prefix
    for a in range(2):
        last = np.flatnonzero(valid[a])[-1]
        assert env.terminated(traj["true"][a, last])               # the terminal state is scored
        assert not np.any(env.terminated(traj["true"][a, :last]))

    err = evaluation.prediction_error(key, sim, env, policy, agents, num_episodes=6, **kw)
    for a in range(2):
        rmse, r2 = reference_metrics(traj["true"][a], traj["predicted"][a], valid[a])
        np.testing.assert_allclose(err.rmse[a, 0], rmse, rtol=1e-4)
        np.testing.assert_allclose(err.r2[a, 0], r2, rtol=1e-4)
    summary = err.summary()
    assert np.all(np.isfinite(np.array(list(summary.values()))))

    # Episodes that end before the window have nothing to score.
    late = evaluation.prediction_error(key, sim, env, policy, agents, num_episodes=2,
                                       warmup=150, horizon=5)
    assert np.all(np.isnan(late.rmse)) and np.all(np.isnan(late.r2))
    with np.errstate(all="raise"):
        assert np.all(np.isnan(np.array(list(late.summary().values()))))


def test_summary_ignores_undefined_episodes():
    err = evaluation.PredictionError(rmse=np.array([[1.0, 3.0, np.nan]]),
                                     r2=np.array([[0.5, np.nan, 0.9]]))
    assert err.summary() == {"rmse": [2.0], "rmse_std": [1.0], "r2_mean": [0.7],
                             "r2_median": [0.7]}


def test_repeated_calls_do_not_recompile(mountaincar):
    env, policy = mountaincar
    run = lambda key, bias, eps: evaluation.prediction_error(
        key, true_dynamics(env, env.test_agents, bias), env, policies.test_policy(env, epsilon=eps),
        env.test_agents[:2], num_episodes=2, warmup=2, horizon=3)
    run(jax.random.PRNGKey(0), np.zeros((2, 2)), None)
    size = prediction._prediction_error_jit._cache_size()
    run(jax.random.PRNGKey(1), np.ones((2, 2)), 0.5)
    assert prediction._prediction_error_jit._cache_size() == size


def test_input_validation(mountaincar, cartpole):
    env, policy = mountaincar
    sim = true_dynamics(env, env.test_agents, np.zeros((2, 2)))
    key, agents = jax.random.PRNGKey(0), env.test_agents
    cases = [
        (dict(num_episodes=0), "num_episodes"),
        (dict(num_episodes=2.0), "num_episodes"),
        (dict(warmup=0), "warmup"),
        (dict(horizon=0), "horizon"),
        (dict(agent_ids=[0, 1, 2, 3, 5]), "agent_ids"),
        (dict(agent_ids=[0, 1, 2, 3, -1]), "agent_ids"),
        (dict(agent_ids=[0, 1]), "agent_ids"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            kwargs = dict(kwargs)
            ids = kwargs.pop("agent_ids", None)
            model = sim if ids is None else true_dynamics(env, agents, np.zeros((2, 2)), ids)
            evaluation.prediction_error(key, model, env, policy, agents, **kwargs)
    with pytest.raises(ValueError, match="epsilon"):
        policies.test_policy(env, epsilon=1.5)
    with pytest.raises(ValueError, match="covariates"):
        evaluation.prediction_error(key, sim, env, policy, agents[:, :, None])
    with pytest.raises(ValueError):
        evaluation.prediction_error(key, sim, env, policy, [[0.1]])      # outside the ranges
    with pytest.raises(ValueError, match="agent_ids"):                  # 6 rows, 5 agents
        evaluation.prediction_trajectories(key, sim, env, policy, np.tile(agents[:3], (2, 1)))
    cp_env, cp_policy = cartpole
    with pytest.raises(ValueError, match="simulator"):
        evaluation.prediction_error(key, true_dynamics(env, agents, np.zeros((2, 2)), [0, 1]),
                                    cp_env, cp_policy, cp_env.test_agents[:2])
    with pytest.raises(ValueError, match="horizon"):
        evaluation.prediction_trajectories(key, sim, env, policy, agents, horizon=-1)
