"""Shared fixtures of the persim_jax tests: MountainCar data logged with random
actions (one vmapped scan of the environment) and one simulator trained on it,
built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# One persistent XLA compilation cache for the whole test run, set before JAX
# starts: the test workers and the commands the tests start as subprocesses
# (they inherit the environment) compile many identical programs (the same
# env steps, planners and training steps built from fresh closures), and
# each is compiled once instead of once per process or closure. The process
# that creates the folder (pytest's controller, or the only process under
# -n0) removes it when it exits; a user's own JAX_COMPILATION_CACHE_DIR is
# kept as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE_DIR = tempfile.mkdtemp(prefix="persim-jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

import jax  # noqa: E402  (after the cache settings, which JAX reads at import)
import jax.numpy as jnp  # noqa: E402
import numpy as np
import pytest

import envs
from persim_jax import data
from persim_jax.persim import train


def collect_random_actions(env_name: str, key: jax.Array, num_agents: int, steps: int):
    """One trajectory per agent under uniformly random discrete actions.

    Every agent plays one episode of at most `steps` steps (steps after its
    episode ends are dropped). Returns (Transitions, covariates (N, P)).
    """
    env = envs.make(env_name)
    agents_key, reset_key, run_key = jax.random.split(key, 3)
    covariates = env.sample_agents(agents_key, num_agents)
    params = env.agent_params(covariates)

    @jax.jit
    def run(reset_key, run_key):
        obs, state = jax.vmap(env.reset)(jax.random.split(reset_key, num_agents), params)

        def step(carry, key):
            obs, state, alive = carry
            action_key, step_key = jax.random.split(key)
            action = jax.random.randint(action_key, (num_agents,), 0, env.num_actions)
            next_obs, state, reward, done, info = jax.vmap(env.step)(
                jax.random.split(step_key, num_agents), state, action, params)
            logged = (obs, action, info["final_observation"], reward, info["terminated"],
                      info["truncated"], alive)
            return (next_obs, state, alive & ~done), logged

        _, logged = jax.lax.scan(step, (obs, state, jnp.ones(num_agents, bool)),
                                 jax.random.split(run_key, steps))
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), logged)   # (N, T, ...)

    obs, action, next_obs, reward, terminated, truncated, alive = run(reset_key, run_key)
    transitions = data.from_rollouts(
        obs, action, next_obs, reward=reward, done=terminated, timeout=truncated, valid=alive,
        num_actions=env.num_actions, covariates=covariates)
    return transitions, np.asarray(covariates)


# The test files by their measured time on 2 cores, longest first (from
# `pytest --durations=0`, summed per file). The workers take whole files
# (`--dist loadfile`) in collection order (`--no-loadscope-reorder`), so
# starting with the longest ones keeps both busy to the end instead of one
# finishing a long file alone. A file missing here runs after these.
LONGEST_FIRST = (
    "test_run.py", "test_commands.py", "test_halfcheetah.py", "test_cadm.py",
    "test_evaluation.py", "test_planning.py", "test_policies.py", "test_train.py",
    "test_decisions.py", "test_diagnostics.py", "test_bcq.py", "test_run_halfcheetah.py",
    "test_decisions_truth.py", "test_paper_scale.py", "test_datasets.py", "test_prediction.py",
    "test_own_data.py", "test_minari.py", "test_cache.py", "test_true_env_mujoco.py",
    "test_methods.py", "test_runtime.py", "test_envs.py", "test_new_agents.py", "test_model.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: keeps test order


@pytest.fixture(scope="session")
def mountaincar_data():
    """(Transitions, covariates): 100 MountainCar agents × 200 random steps."""
    return collect_random_actions("mountaincar", jax.random.PRNGKey(0), 100, 200)


FIT_KEY = jax.random.PRNGKey(1)


@pytest.fixture(scope="session")
def mountaincar_fit(mountaincar_data):
    """(Simulator, [EpochMetrics]): a rank-3 ensemble of 3 small members."""
    transitions, _ = mountaincar_data
    history = []
    simulator = train.fit(transitions, rank=3, key=FIT_KEY, ensemble_size=3, epochs=25,
                          learning_rate=3e-3, state_hidden=(64,), callback=history.append,
                          progress=False)
    return simulator, history


@pytest.fixture(scope="session")
def small_mountaincar_data():
    """(Transitions, covariates): 20 agents × 50 steps, for tests that fit
    several times."""
    return collect_random_actions("mountaincar", jax.random.PRNGKey(7), 20, 50)
