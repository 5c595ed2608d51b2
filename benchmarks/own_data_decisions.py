"""Decisions on a user's file, checked where the truth is known: a paper dataset
exported to the long format as a user would hold it, decided on with the
example reward and policies of `experiments/examples/`.

    python -m benchmarks.own_data_decisions --env=cartpole --dataset=pure
    python -m benchmarks.own_data_decisions --env=mountaincar --dataset=random --horizon=150

Steps:
  1. the paper's dataset (`--preset`'s number of agents), written with
     `persim_jax.data.save_csv` (no covariates: the user does not know them);
  2. `experiments.run --dataset=FILE.csv --env=E --decide --reward=... --policies=...`
     (in-process, `pipeline.run_pipeline`), the preset's training and planner,
     deciding for the test agents (units 0..4);
  3. (a) the true value of each example policy for each test agent: the same
     start states and horizon in the agent's true physics; does the agent's
     simulator rank the two policies as the truth does?
  4. (b) `--episodes` MPC episodes per test agent in its true physics, planned
     on its simulator from the own-data run with the user's reward, beside the
     same planner with the env's own reward (what `experiments.run --env`
     plans with), and beside the committed record of `experiments.run --env`
     for the cell (PerSim's mean reward).

Writes `--out` (default `benchmarks/results/own_data_decisions_<env>_<dataset>.json`)
atomically; the work files go to `--work_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import envs
from benchmarks.common import machine
from experiments import config as config_lib
from experiments import decisions as decisions_stage
from experiments import intervals, own_data, pipeline
from experiments.datagen import datasets
from persim_jax import Simulator, data, decisions, evaluation
from persim_jax.dynamics import simulator_dynamics_for_agent
from persim_jax.evaluation.episodes import PolicyActor

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "examples")
# The two policies compared per env (`experiments/examples/<env>.py`).
POLICIES = {"cartpole": ("balance", "push_left"), "mountaincar": ("pump", "push_left")}
TEST_AGENTS = ("0", "1", "2", "3", "4")
RECORD = os.path.join("experiments", "results", "{preset}", "{env}", "{dataset}", "results.json")


def example(env_name: str, name: str) -> str:
    """The spec of `name` in the env's example file."""
    return f"{os.path.join(EXAMPLES, env_name + '.py')}:{name}"


def true_values(env, covariates, starts, policies: dict, horizon: int, seed: int) -> dict:
    """{name: (K,) the mean over starts of each policy's return in the true
    physics}, from the same (K, S, D) start states as the decisions."""
    params = env.covariates_to_params(jnp.asarray(covariates))       # leaves (K,)

    def one(key, agent_params, obs, policy):
        state = env.state_from_obs(obs, agent_params)
        return decisions.rollout_return(key, PolicyActor(policy), env, agent_params, state,
                                        horizon)

    values = {}
    for name, policy in policies.items():
        over_starts = jax.vmap(lambda k, p, o: one(k, p, o, policy), in_axes=(None, None, 0))
        over_agents = jax.jit(jax.vmap(over_starts))
        keys = jax.random.split(jax.random.PRNGKey(seed), len(covariates))
        values[name] = np.asarray(over_agents(keys, params, jnp.asarray(starts))).mean(axis=1)
    return values


def run_benchmark(env_name: str, dataset: str, *, work_dir: str, preset: str = "quick",
                  overrides: dict | None = None, horizon: int = 50, starts: int = 4,
                  episodes: int = 5, seed: int = 0) -> dict:
    """Steps 1-4 of the module; returns the record."""
    env = envs.make(env_name)
    config = config_lib.resolve(env_name, "file.csv", preset, overrides)
    start = time.time()
    transitions, _ = datasets.load_or_generate(env_name, dataset,
                                               data_dir=os.path.join(work_dir, "data"),
                                               seed=seed, num_agents=config.num_agents)
    csv_path = os.path.join(work_dir, f"{env_name}_{dataset}.csv")
    data.save_csv(csv_path, transitions)
    first, second = POLICIES[env_name]
    request = decisions_stage.DecisionRequest(
        reward=example(env_name, "reward"), terminated=example(env_name, "terminated"),
        policies=(example(env_name, first), example(env_name, second)), agents=TEST_AGENTS,
        horizon=horizon, starts=starts)
    out_dir = os.path.join(work_dir, "runs")
    results = pipeline.run_pipeline(env_name, csv_path, config, preset=preset, seed=seed,
                                    out_dir=out_dir, data_dir=os.path.join(work_dir, "data"),
                                    skip=("plots",), decide=request)
    everything = own_data.load_user_file(csv_path)
    prepared = decisions_stage.prepare(request, env, everything)
    covariates = np.asarray(transitions.covariates)[:len(TEST_AGENTS)]

    # (a) the simulators' ranking against the truth's.
    truth = true_values(env, covariates, prepared.starts, prepared.policies, horizon, seed)
    ranking = []
    for k, agent in enumerate(TEST_AGENTS):
        row = results["decisions"][agent]["policies"]
        simulated = row[first]["mean"] - row[second]["mean"]
        true = float(truth[first][k] - truth[second][k])
        ranking.append({"agent": agent, "covariates": covariates[k].tolist(),
                        "simulated": {n: row[n] for n in (first, second)},
                        "true": {n: float(truth[n][k]) for n in (first, second)},
                        "same_order": bool(np.sign(simulated) == np.sign(true))})

    # (b) planned episodes in the true physics: the user's reward vs the env's.
    simulator = Simulator.load(os.path.join(out_dir, env_name, f"{env_name}_{dataset}",
                                            "simulator_trial0.msgpack"))
    dynamics_for_agent = simulator_dynamics_for_agent(simulator, list(range(len(TEST_AGENTS))))
    reward = decisions_stage.resolve_reward(prepared, env, everything, None, seed)
    episodes_of = {}
    for label, used in (("user_reward", reward),
                        ("env_reward", decisions_stage.Reward(env.reward, env.terminated, {}))):
        planner, _, _ = decisions_stage.decision_planner(config, env, everything, used, None)
        returns = evaluation.run_episodes(jax.random.PRNGKey(seed), planner, dynamics_for_agent,
                                          env, covariates, num_episodes=episodes)
        episodes_of[label] = np.asarray(returns).tolist()
    return {
        "bench": "own_data_decisions", "env": env_name, "dataset": dataset, "preset": preset,
        "seed": seed, "config": data.jsonable(dataclasses.asdict(config)),
        "decision": {"horizon": horizon, "starts": starts, "policies": [first, second]},
        "ranking": ranking,
        "same_order": sum(r["same_order"] for r in ranking),
        "episodes": {"per_agent": {k: v for k, v in episodes_of.items()},
                     "mean": {k: float(np.mean(v)) for k, v in episodes_of.items()},
                     "over": "test agents × episodes of one trial"},
        "record": versus_record(env_name, dataset, preset, episodes_of["user_reward"]),
        "decision_summary": results["decision_summary"],
        "seconds": round(time.time() - start, 1),
        "machine": machine(),
    }


def versus_record(env_name: str, dataset: str, preset: str, own_returns) -> dict | None:
    """The committed record's PerSim reward for the cell, and own data minus
    it with the bootstrap 95 % interval (`experiments.intervals`; own data:
    1 trial, (K, E) returns); None where the cell is not recorded."""
    path = RECORD.format(preset=preset, env=env_name, dataset=dataset)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        recorded = json.load(handle)["reward"]["persim"]
    found = intervals.bootstrap_difference(np.asarray(own_returns)[None],
                                           np.asarray(recorded["returns"]))
    return {"path": path, "persim_mean": float(np.mean(recorded["mean"])),
            "persim_per_agent": recorded["mean"], "own_data_minus_record": found._asdict()}


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags, defined only when it runs as a program (the tests
    import `run_benchmark` beside modules that define --env too)."""
    flags.DEFINE_enum("env", "cartpole", list(POLICIES), "Environment.")
    flags.DEFINE_enum("dataset", "pure", list(datasets.DATASETS), "Paper dataset.")
    flags.DEFINE_enum("preset", "quick", ["quick", "paper"], "Training and planner sizes.")
    flags.DEFINE_integer("horizon", 50, "Steps of each policy value.")
    flags.DEFINE_integer("starts", 4, "Logged start states per agent.")
    flags.DEFINE_integer("episodes", 5, "MPC episodes per test agent.")
    flags.DEFINE_string("work_dir", os.path.join("runs", "own_data_decisions"),
                        "Dataset, CSV and run directory.")
    flags.DEFINE_string("out", None, "The record (default benchmarks/results/"
                        "own_data_decisions_<env>_<dataset>.json).")
    flags.DEFINE_bool("rescore", False, "Run nothing: recompute --out's comparison with the "
                      "committed record (its `record` field) from its own episodes.")


def main(argv):
    del argv
    out = FLAGS.out or os.path.join("benchmarks", "results",
                                    f"own_data_decisions_{FLAGS.env}_{FLAGS.dataset}.json")
    if FLAGS.rescore:
        with open(out) as handle:
            record = json.load(handle)
        record["record"] = versus_record(record["env"], record["dataset"], record["preset"],
                                         record["episodes"]["per_agent"]["user_reward"])
        data.write_json(out, record)
        print(json.dumps(record["record"], indent=1))
        return
    record = run_benchmark(FLAGS.env, FLAGS.dataset, work_dir=FLAGS.work_dir,
                           preset=FLAGS.preset, horizon=FLAGS.horizon, starts=FLAGS.starts,
                           episodes=FLAGS.episodes)
    data.write_json(out, record)
    print(json.dumps({k: record[k] for k in ("env", "dataset", "same_order", "episodes",
                                             "record", "seconds")}, indent=1))


if __name__ == "__main__":
    define_flags()
    app.run(main)
