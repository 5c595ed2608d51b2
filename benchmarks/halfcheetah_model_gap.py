"""Where PerSim's HalfCheetah reward is lost: what the simulator believes of
the plans it makes and of the plans True env + MPC makes, against what the
real agent earns with them.

    python -m benchmarks.halfcheetah_model_gap [--run_dir=runs/quick/halfcheetah/random]
        [--preset=quick] [--dataset=random] [--steps=1000] [--stride=10] [--seed=0] [--data_dir=data]
        [--num_agents=N]
        [--out=benchmarks/results/halfcheetah_model_gap.json]

For each of the 5 test agents, one episode of PerSim's MPC (the run's
planner on the run's trained simulator, `simulator_trial0.msgpack`) and one of
True env + MPC (the same planner on the agent's own physics, MuJoCo's C
simulator) are played in the real env and recorded. Then, every `--stride`
steps t of each recorded episode, the simulator scores the H actions the
episode really took from t (H: the planner's horizon, from the real state at
t), member by member, as the planner scores a candidate (`member_returns`:
same discount, no shaping), beside the discounted return those actions
really earned from t. Averaged over the windows:

- on PerSim's own episode, belief above reality is the planner exploiting
  the simulator's errors;
- on True env + MPC's episode, belief below reality is the simulator not
  seeing the return of plans that work, which the planner then never picks.

Also the one-step RMSE of the simulator's next state (ensemble mean) along
each episode, and the mean forward velocity (obs[0], the env's reward
without its control cost) beside the simulator's one-step prediction of it.
And what the run's dataset holds of running: quantiles of the forward
velocity over its transitions, all agents' and each test agent's own, and
the share of transitions faster than each agent's mean velocity under True
env + MPC.

One JSON file, rewritten atomically after each part; a rerun with the same
settings keeps the episodes it finds and computes the rest.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import envs
from experiments import config as config_lib
from experiments import stages
from experiments.datagen.datasets import dataset_path
from persim_jax import planning
from persim_jax.data import atomic_write
from persim_jax.dynamics import simulator_dynamics_for_agent, true_env_dynamics_for_agent
from persim_jax.evaluation.episodes import PlannerActor
from persim_jax.persim.simulator import Simulator

_RUN_DIR = flags.DEFINE_string("run_dir", os.path.join("runs", "quick", "halfcheetah", "random"),
                               "A HalfCheetah run folder holding simulator_trial0.msgpack.")
_PRESET = flags.DEFINE_string("preset", "quick", "The run's preset (its planner).")
_DATASET = flags.DEFINE_string("dataset", "random", "The run's dataset.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Steps per recorded episode.")
_STRIDE = flags.DEFINE_integer("stride", 10, "Steps between scored windows.")
_SEED = flags.DEFINE_integer("seed", 0, "Episode keys.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "Where the run's dataset is cached.")
_RUN_SEED = flags.DEFINE_integer("run_seed", 0, "The run's seed (experiments.run --seed): "
                                 "which dataset.")
_NUM_AGENTS = flags.DEFINE_integer("num_agents", None, "The run's agents (experiments.run "
                                   "--num_agents): which dataset; default the preset's.")
_OUT = flags.DEFINE_string("out", os.path.join("benchmarks", "results",
                                               "halfcheetah_model_gap.json"), "JSON file.")


def record_episode(key, actor, env, params, steps: int):
    """One episode of `actor` in the real env (no auto reset), recorded:
    (obs (T, D), action (T, A), reward (T,), next_obs (T, D), alive (T,)),
    alive False from the step after the first termination."""
    reset_key, run_key = jax.random.split(key)
    obs, state = env.reset(reset_key, params)

    def step(carry, key):
        obs, state, actor_state, alive = carry
        act_key, step_key = jax.random.split(key)
        action, actor_state = actor.act(act_key, actor_state, obs)
        next_obs, state, reward, terminated, _ = env.step_env(step_key, state, action, params)
        actor_state = actor.observe(actor_state, obs, action, next_obs)
        return (next_obs, state, actor_state, alive & ~terminated), (obs, action, reward,
                                                                     next_obs, alive)

    carry = (obs, state, actor.init(key), jnp.array(True))
    _, recorded = jax.lax.scan(step, carry, jax.random.split(run_key, steps))
    return recorded


def window_scores(dynamics, env, planner_config, obs, actions, rewards, starts):
    """At each start t: ((M,) the members' discounted returns of
    actions[t:t+H] from obs[t], () the discounted return they really earned)."""
    horizon, discount = planner_config.horizon, planner_config.discount
    weights = discount ** jnp.arange(horizon)

    def one(t):
        window = jax.lax.dynamic_slice_in_dim(actions, t, horizon)
        believed = planning.member_returns(dynamics, env.reward, env.terminated, obs[t],
                                           window[None], discount=discount)[:, 0]
        real = jnp.sum(weights * jax.lax.dynamic_slice_in_dim(rewards, t, horizon))
        return believed, real

    return jax.lax.map(one, starts)


def data_coverage(path: str, num_test_agents: int, fast) -> dict:
    """What the dataset at `path` holds of running: forward-velocity
    (next obs[0]) quantiles over all transitions and over each test agent's
    own (units 0..K-1), and for each test agent the share of all transitions
    faster than `fast[k]` (its mean velocity under True env + MPC)."""
    with np.load(path) as data:
        velocity, agent = data["next_observations"][:, 0], data["agent_ids"]
    quantiles = (0.5, 0.9, 0.99, 1.0)
    return {"file": path, "transitions": int(velocity.size), "quantiles": list(quantiles),
            "velocity_quantiles": np.quantile(velocity, quantiles).tolist(),
            "test_agent_velocity_quantiles": [
                np.quantile(velocity[agent == k], quantiles).tolist()
                for k in range(num_test_agents)],
            "share_faster_than_true_env_mpc": [float(np.mean(velocity > v)) for v in fast]}


def main(argv):
    del argv
    env = envs.make("halfcheetah")
    config = config_lib.resolve("halfcheetah", _DATASET.value, _PRESET.value)
    num_agents = _NUM_AGENTS.value or config.num_agents          # which dataset the run used
    planner_config = config.planner_config(env)
    planner = stages.planner_for(env, config)
    simulator = Simulator.load(os.path.join(_RUN_DIR.value, "simulator_trial0.msgpack"))
    covariates = jnp.asarray(env.test_agents, jnp.float32)
    rows = jnp.arange(len(covariates))
    params = env.agent_params(covariates)
    # The test agents are units 0..4 of the paper's datasets (stages.test_agents_of).
    persim_for_agent = simulator_dynamics_for_agent(simulator, list(range(len(covariates))))
    true_for_agent = true_env_dynamics_for_agent(env, "mujoco")
    keys = jax.random.split(jax.random.PRNGKey(_SEED.value), len(covariates))
    starts = jnp.arange(0, _STEPS.value - planner_config.horizon + 1, _STRIDE.value)

    def analyse(for_agent):
        def one(key, row, covariates, params):
            obs, action, reward, next_obs, alive = record_episode(
                key, PlannerActor(planner, for_agent(row, covariates)), env, params,
                _STEPS.value)
            model = persim_for_agent(row, covariates)
            believed, real = window_scores(model, env, planner_config, obs, action, reward,
                                           starts)
            predicted = jnp.mean(model(obs, action), axis=0)          # (T, D) members' mean
            one_step = jnp.sqrt(jnp.mean((predicted - next_obs) ** 2, axis=-1))
            return dict(episode_return=jnp.sum(jnp.where(alive, reward, 0.0)),
                        believed_min=jnp.mean(jnp.min(believed, axis=1)),
                        believed_mean=jnp.mean(jnp.mean(believed, axis=1)),
                        real=jnp.mean(real),
                        one_step_rmse=jnp.mean(one_step),
                        forward_velocity=jnp.mean(next_obs[:, 0]),
                        predicted_forward_velocity=jnp.mean(predicted[:, 0]),
                        all_alive=jnp.all(alive))
        return jax.jit(jax.vmap(one))(keys, rows, covariates, params)

    settings = {"bench": "halfcheetah_model_gap", "run_dir": _RUN_DIR.value,
                "preset": _PRESET.value, "dataset": _DATASET.value, "seed": _SEED.value,
                "steps": _STEPS.value, "stride": _STRIDE.value,
                "num_agents": num_agents,
                "planner": stages.planner_description(planner),
                "covariates": np.asarray(covariates).tolist()}
    record = {**settings, "episodes": {}}
    if os.path.exists(_OUT.value):
        with open(_OUT.value, encoding="utf-8") as handle:
            previous = json.load(handle)
        if all(previous.get(name) == value for name, value in settings.items()):
            record = {**previous, **settings}

    def save():
        with atomic_write(_OUT.value, "w") as handle:
            handle.write(json.dumps(record, indent=1) + "\n")

    for name, for_agent in (("persim", persim_for_agent), ("true_env_mpc", true_for_agent)):
        if name in record["episodes"]:
            continue
        start = time.time()
        result = jax.tree.map(lambda x: np.asarray(x).tolist(), analyse(for_agent))
        result["seconds"] = round(time.time() - start, 1)
        record["episodes"][name] = result
        print(name, json.dumps(result), flush=True)
        save()
    record["data"] = data_coverage(
        dataset_path("halfcheetah", _DATASET.value, data_dir=_DATA_DIR.value,
                     seed=_RUN_SEED.value, num_agents=num_agents),
        len(covariates), record["episodes"]["true_env_mpc"]["forward_velocity"])
    print("data", json.dumps(record["data"]), flush=True)
    save()
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
