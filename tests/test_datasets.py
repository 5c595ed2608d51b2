"""Dataset generation: shapes, determinism, termination, ε-mixing, the
nearest-training-agent assignment, caching and the Table 8 statistics.

Small configurations (20-60 agents) on CartPole and MountainCar with the
shipped pure policies; the HalfCheetah path is checked on a short horizon.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from experiments.datagen import datasets, policies
from persim_jax import data

NUM_AGENTS = 20


@pytest.fixture(scope="module")
def cartpole():
    return envs.make("cartpole")


@pytest.fixture(scope="module")
def cartpole_pure(cartpole):
    return policies.load_pure_policies(cartpole)


@pytest.fixture(scope="module")
def cartpole_eps(cartpole, cartpole_pure):
    """60 CartPole agents under the pure policies with ε = 0.4."""
    covariates = cartpole.sample_agents(jax.random.PRNGKey(3), 60)
    return covariates, datasets.collect(cartpole, covariates, jax.random.PRNGKey(4), epsilon=0.4,
                                        pure_params=cartpole_pure)


@pytest.fixture(scope="module")
def cartpole_random_small():
    """(Transitions, metadata) of the random CartPole dataset, 20 agents."""
    return datasets.generate("cartpole", "random", seed=5, num_agents=NUM_AGENTS)


def test_shapes_and_covariates(cartpole, cartpole_random_small):
    transitions, metadata = cartpole_random_small
    t = transitions.num_transitions
    assert transitions.num_agents == NUM_AGENTS
    assert transitions.obs.shape == (t, 4) and transitions.next_obs.shape == (t, 4)
    assert transitions.action.shape == (t,) and transitions.num_actions == 2
    assert set(np.unique(transitions.action)) <= {0, 1}
    assert transitions.covariates.shape == (NUM_AGENTS, 2)
    # Units 0..4 are the paper's test agents.
    np.testing.assert_allclose(transitions.covariates[:5], cartpole.test_agents, rtol=1e-6)
    assert metadata["num_transitions"] == t
    assert metadata["paper"] is None      # only for the paper's 500 agents
    # What the floats depend on besides the request (HalfCheetah's datasets
    # differ between kinds of CPU): recorded beside the data.
    assert metadata["cpu"] == datasets.host_cpu() and metadata["libraries"]["jax"]
    # The statistics in the metadata are those of the transitions.
    ours = datasets.transitions_stats(transitions)
    for key in ("test_agent_return", "mean_return", "mean_length"):
        np.testing.assert_allclose(ours[key], metadata["stats"][key], rtol=1e-6)


def test_halfcheetah_continuous_actions_short_horizon():
    env = envs.make("halfcheetah")
    covariates = env.sample_agents(jax.random.PRNGKey(0), 6)
    rollout = datasets.collect(env, covariates, jax.random.PRNGKey(1), epsilon=1.0, num_steps=8)
    assert rollout["obs"].shape == (6, 8, 18) and rollout["action"].shape == (6, 8, 6)
    assert np.all(np.abs(rollout["action"]) <= 1.0)
    assert rollout["valid"].all() and not rollout["terminated"].any()
    # The logged next state is the next step's state.
    np.testing.assert_array_equal(rollout["next_obs"][:, :-1], rollout["obs"][:, 1:])


def test_same_seed_same_arrays_other_seed_other_arrays():
    first, meta1 = datasets.generate("cartpole", "pure_eps20", seed=11, num_agents=NUM_AGENTS)
    second, meta2 = datasets.generate("cartpole", "pure_eps20", seed=11, num_agents=NUM_AGENTS)
    for name in ("obs", "action", "next_obs", "reward", "done", "timeout", "agent_id",
                 "covariates"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)
    assert meta1["stats"] == meta2["stats"]
    other, _ = datasets.generate("cartpole", "pure_eps20", seed=12, num_agents=NUM_AGENTS)
    assert not np.array_equal(np.asarray(first.covariates), np.asarray(other.covariates))


def test_one_episode_per_agent_terminal_kept_nothing_after(cartpole, cartpole_random_small):
    transitions, _ = cartpole_random_small
    agent_id = np.asarray(transitions.agent_id)
    done, timeout = np.asarray(transitions.done), np.asarray(transitions.timeout)
    obs, next_obs = np.asarray(transitions.obs), np.asarray(transitions.next_obs)
    lengths = transitions.transitions_per_agent()
    assert np.all(lengths >= 1) and np.all(lengths <= cartpole.max_episode_steps)
    for n in range(NUM_AGENTS):
        rows = np.flatnonzero(agent_id == n)
        assert np.all(np.diff(rows) == 1)                 # contiguous, in time order
        end = done[rows] | timeout[rows]
        assert end[-1] and not end[:-1].any()             # ends once, at its last row
        np.testing.assert_array_equal(obs[rows[1:]], next_obs[rows[:-1]])   # one trajectory
        if done[rows[-1]]:
            # The terminal transition is kept: its next state is a failure state.
            assert bool(cartpole.terminated(jnp.asarray(next_obs[rows[-1]])))
        else:
            assert lengths[n] == cartpole.max_episode_steps
    # Random actions fail CartPole long before the cap on most agents.
    assert done.sum() >= NUM_AGENTS // 2


def test_collect_masks_steps_after_the_episode(cartpole_eps):
    _, rollout = cartpole_eps
    valid = rollout["valid"]
    ended = rollout["terminated"] | rollout["truncated"]
    lengths = valid.sum(axis=1)
    for n in range(valid.shape[0]):
        assert valid[n, :lengths[n]].all() and not valid[n, lengths[n]:].any()
        assert ended[n, lengths[n] - 1]
        assert not (ended[n, :lengths[n] - 1]).any()


def test_epsilon_mixing_rate(cartpole_eps):
    _, rollout = cartpole_eps
    valid = rollout["valid"]
    steps = int(valid.sum())
    assert steps > 2000
    explored = rollout["explored"][valid]
    # Binomial(steps, 0.4): 5 standard deviations.
    assert abs(explored.mean() - 0.4) < 5 * np.sqrt(0.4 * 0.6 / steps)
    # A uniform random action among 2 differs from the greedy one half the time.
    non_greedy = (rollout["action"] != rollout["greedy_action"])[valid]
    assert abs(non_greedy.mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / steps)
    assert not non_greedy[~explored].any()


def test_pure_dataset_has_no_exploration(cartpole, cartpole_pure):
    covariates = cartpole.sample_agents(jax.random.PRNGKey(8), NUM_AGENTS)
    rollout = datasets.collect(cartpole, covariates, jax.random.PRNGKey(9), epsilon=0.0,
                               pure_params=cartpole_pure)
    assert not rollout["explored"].any()
    np.testing.assert_array_equal(rollout["action"], rollout["greedy_action"])


def test_nearest_training_agent_assignment(cartpole, cartpole_pure, cartpole_eps):
    covariates, rollout = cartpole_eps
    cov = np.asarray(covariates, np.float64)
    low, high = np.array(cartpole.agents.low), np.array(cartpole.agents.high)
    train = cartpole.policy_training_agents
    distance = ((((cov - low) / (high - low))[:, None] - (train - low) / (high - low)) ** 2).sum(-1)
    np.testing.assert_array_equal(rollout["policy_index"], distance.argmin(axis=1))
    # Test agents (2, .5) -> (6, .5); (18, .5) -> (14, .5); (10, .85) -> (10, .675);
    # (10, .15) -> (10, .325); the default agent (10, .5) is a training agent.
    np.testing.assert_array_equal(rollout["policy_index"][:5], [0, 2, 1, 3, 4])
    # Each agent's greedy action is its own policy's action on its own states.
    valid = rollout["valid"]
    for n in (0, 2, 4, 7):
        params = policies.unstack(cartpole_pure, int(rollout["policy_index"][n]))
        expected = policies.greedy_action(cartpole, params, jnp.asarray(rollout["obs"][n]))
        np.testing.assert_array_equal(rollout["greedy_action"][n][valid[n]],
                                      np.asarray(expected)[valid[n]])


def test_cache_reuse_force_and_sidecar(tmp_path):
    kwargs = dict(data_dir=tmp_path, seed=2, num_agents=NUM_AGENTS)
    first, meta = datasets.load_or_generate("mountaincar", "random", **kwargs)
    path = datasets.dataset_path("mountaincar", "random", **kwargs)
    assert not meta["cached"] and meta["path"] == path and os.path.exists(path)
    with open(datasets.metadata_path(path)) as handle:
        sidecar = json.load(handle)
    assert sidecar["stats"] == meta["stats"] and sidecar["policies_sha256"] is None
    assert sidecar["generation_seconds"] > 0
    mtime = os.path.getmtime(path)
    again, meta2 = datasets.load_or_generate("mountaincar", "random", **kwargs)
    assert meta2["cached"] and os.path.getmtime(path) == mtime
    np.testing.assert_array_equal(np.asarray(first.obs), np.asarray(again.obs))
    np.testing.assert_array_equal(np.asarray(first.covariates), np.asarray(again.covariates))
    # The file is the data module's format.
    loaded = data.load_npz(path)
    assert loaded.num_agents == NUM_AGENTS and loaded.num_actions == 3
    forced, meta3 = datasets.load_or_generate("mountaincar", "random", force=True, **kwargs)
    assert not meta3["cached"]
    np.testing.assert_array_equal(np.asarray(first.obs), np.asarray(forced.obs))
    # No temporary files left behind by the atomic writes.
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(path), os.path.basename(datasets.metadata_path(path))])


def test_stale_cache_is_regenerated_when_the_request_differs(tmp_path):
    kwargs = dict(data_dir=tmp_path, num_agents=NUM_AGENTS)
    _, meta = datasets.load_or_generate("mountaincar", "random", seed=0, **kwargs)
    sidecar = datasets.metadata_path(meta["path"])
    with open(sidecar) as handle:
        content = json.load(handle)
    content["policies_sha256"] = "something else"
    with open(sidecar, "w") as handle:
        json.dump(content, handle)
    _, meta2 = datasets.load_or_generate("mountaincar", "random", seed=0, **kwargs)
    assert not meta2["cached"]


def test_random_mountaincar_rarely_reaches_the_goal():
    # Table 8: random MountainCar data run to the cap (mean length 496 of 500).
    _, metadata = datasets.generate("mountaincar", "random", seed=0, num_agents=NUM_AGENTS)
    assert metadata["stats"]["mean_length"] > 400
    assert metadata["stats"]["explored_fraction"] == 1.0


def test_validation_at_the_edge(cartpole):
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.dataset_path("cartpole", "expert")
    with pytest.raises(ValueError, match="unknown environment"):
        datasets.generate("pendulum", "pure")
    with pytest.raises(ValueError, match="pure_params"):
        datasets.collect(cartpole, cartpole.test_agents, jax.random.PRNGKey(0), epsilon=0.2)
    with pytest.raises(ValueError, match="epsilon"):
        datasets.collect(cartpole, cartpole.test_agents, jax.random.PRNGKey(0), epsilon=1.5)
    with pytest.raises(FileNotFoundError, match="train_policies"):
        datasets.generate("cartpole", "pure", num_agents=5, policy_dir="/nonexistent")
