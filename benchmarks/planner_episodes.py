"""End-to-end MPC reward of each continuous planner: full episodes of the test
agents in the true environment, planning on the learned simulator.

    python -m benchmarks.planner_episodes [--env=halfcheetah] [--simulator=PATH]
        [--planners=icem_0.25,cem_paper] [--agents=0,1,2,3,4] [--max_steps=N]
        [--out=benchmarks/results/planner_episodes.jsonl] [--seed=0] [--table]

The simulator is `--simulator` (a `simulator_trial*.msgpack`), default the
quick run's, trained first when missing, as in `benchmarks.planner_quality`. A planner is `cem_paper` (the
paper's CEM, 200 samples × 6 rounds × horizon 30) or `icem_F`: iCEM sized to
the fraction F of the paper CEM's sequences per plan
(`experiments.paper.icem_config`). Every (planner, agent) pair plays
one episode of `--max_steps` (default the env's cap, 1000 for HalfCheetah) in
the agent's true physics and appends one JSON line to `--out`: `bench`
("planner_episodes"), `planner`, `budget_fraction`, `model_evaluations` (per
plan), `agent`, `covariates`, `episode_return`, `steps`, `seconds`,
`seconds_per_step`. Pairs already in `--out` (same env, simulator, steps,
seed) are skipped, so an interrupted run resumes where it stopped: one paper-
CEM HalfCheetah episode is ~30 min on 2 CPU cores.

`--table` prints the recorded rows as a Markdown table (one row per planner
and seed, a column per agent). Episode keys: agent a plays with `fold_in(PRNGKey(seed), a)` whatever the
planner, so every planner meets the same initial state of the agent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

import envs
from benchmarks.common import machine, simulator_path
from experiments import paper
from experiments.datagen import datasets
from persim_jax import Simulator, data, evaluation, planning
from persim_jax.dynamics import simulator_dynamics_for_agent

_ENV = flags.DEFINE_string("env", "halfcheetah", "A continuous-action environment.")
_DATASET = flags.DEFINE_string("dataset", "random", "Dataset of the simulator.")
_SIMULATOR = flags.DEFINE_string("simulator", None, "A trained simulator_trial*.msgpack.")
_DATA_DIR = flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR,
                                "Dataset cache (to train the simulator when missing).")
_PLANNERS = flags.DEFINE_list("planners", ["icem_0.25", "cem_paper"],
                              "cem_paper, or icem_F for iCEM at the fraction F of its budget.")
_AGENTS = flags.DEFINE_list("agents", ["0", "1", "2", "3", "4"], "Test agents (0..4).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Steps per episode (default: the env's cap).")
_OUT = flags.DEFINE_string("out", os.path.join("benchmarks", "results", "planner_episodes.jsonl"),
                           "JSON lines, appended; finished pairs are skipped.")
_SEED = flags.DEFINE_integer("seed", 0, "Episode keys.")
_TABLE = flags.DEFINE_bool("table", False,
                           "Print the recorded rows of --out as a Markdown table; run nothing.")


def make_planner(name: str, env):
    """(planner, budget fraction: its model evaluations per plan over the paper
    CEM's, i.e. sequences × horizon)
    of a `--planners` entry:

      cem_paper     the paper's CEM (200 samples, horizon 30, 6 rounds, 50 elites);
      cem_SxHxR     CEM with S samples, horizon H, R rounds in all, S/5 elites
                    (the quick preset's former planner: cem_50x10x3);
      icem_F        iCEM at the fraction F of the paper CEM's sequences per plan;
      icem_F_hH     the same with horizon H (at the quick CEM's cost: icem_0.125_h10);
      ..._bB        (an icem entry's option) coloured noise of exponent B;
      ..._mean      (an icem entry's option) play the final mean, as CEM does,
                    instead of the best sequence.
    """
    cem = paper.planner_config(env)
    paper_sequences = cem.num_samples * (cem.num_rounds + 1)
    try:
        kind, _, rest = name.partition("_")
        if name == "cem_paper":
            config = cem
        elif kind == "cem":
            samples, horizon, rounds = (int(x) for x in rest.split("x"))
            config = paper.planner_config(env, num_samples=samples, horizon=horizon,
                                          num_rounds=rounds - 1,
                                          num_elites=max(2, samples // 5))
        elif kind == "icem":
            fraction, *options = rest.split("_")
            overrides, fields = {}, {}
            for option in options:
                if option == "mean":
                    fields["execute"] = "mean"
                elif option.startswith("h"):
                    overrides["horizon"] = int(option[1:])
                elif option.startswith("b"):
                    fields["beta"] = float(option[1:])
                else:
                    raise ValueError(f"unknown option {option!r}")
            config = dataclasses.replace(paper.icem_config(env, float(fraction), **overrides),
                                         **fields)
        else:
            raise ValueError("unknown kind")
    except ValueError as error:
        raise app.UsageError(f"--planners: {name!r}: {error} (cem_paper, cem_SxHxR, icem_F, "
                             "icem_F_hH, icem options _bB and _mean)") from None
    planner = planning.make_planner(config, env)
    evaluations = sequences_per_plan(planner) * config.horizon
    return planner, round(evaluations / (paper_sequences * cem.horizon), 4)


def sequences_per_plan(planner) -> int:
    config = planner.config
    if isinstance(config, planning.ICEMConfig):
        return config.sequences_per_plan()
    return config.num_samples * (config.num_rounds + 1)


def done_pairs(path: str, identity: dict) -> set[tuple[str, int]]:
    """(planner, agent) pairs already recorded in `path` under `identity`."""
    if not os.path.exists(path):
        return set()
    done = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            if all(row.get(k) == v for k, v in identity.items()):
                done.add((row["planner"], row["agent"]))
    return done


def append_line(path: str, row: dict) -> None:
    """Appends one JSON line: the file is rewritten whole and atomically, so a
    crash leaves the previous lines intact."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with data.atomic_write(path, mode="w") as handle:
        handle.write(old + json.dumps(row) + "\n")


def table(path: str, env) -> str:
    """Markdown: one row per (planner, seed), the return of each agent and
    the mean over the agents recorded, with the mean seconds per step."""
    rows: dict[tuple[str, int], dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            entry = rows.setdefault((row["planner"], row["seed"]), {
                "returns": {}, "seconds": [], "evaluations": row["model_evaluations"],
                "fraction": make_planner(row["planner"], env)[1]})
            entry["returns"][row["agent"]] = row["episode_return"]
            entry["seconds"].append(row["seconds_per_step"])
    agents = sorted({a for entry in rows.values() for a in entry["returns"]})
    lines = ["| planner | seed | model evaluations per plan (fraction of the paper CEM's) | "
             + " | ".join(f"agent {a}" for a in agents) + " | mean | s / step |",
             "|---|---:|---:|" + "---:|" * (len(agents) + 2)]
    for (name, seed), entry in rows.items():
        returns = entry["returns"]
        cells = [f"{returns[a]:.1f}" if a in returns else "–" for a in agents]
        mean = f"{np.mean(list(returns.values())):.1f}" + (
            "" if len(returns) == len(agents) else f" ({len(returns)} agents)")
        lines.append(f"| {name} | {seed} | {entry['evaluations']:,} ({entry['fraction']:g}) | "
                     + " | ".join(cells) + f" | {mean} | {np.mean(entry['seconds']):.3f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    env = envs.make(_ENV.value)
    if _TABLE.value:
        print(table(_OUT.value, env))
        return
    if env.discrete_actions:
        raise app.UsageError(f"--env: {_ENV.value} has discrete actions; iCEM and CEM plan "
                             "continuous ones")
    agents = [int(a) for a in _AGENTS.value]
    if any(not 0 <= a < len(env.test_agents) for a in agents):
        raise app.UsageError(f"--agents: test agents are 0..{len(env.test_agents) - 1}")
    planners = {name: make_planner(name, env) for name in _PLANNERS.value}
    path = simulator_path(_SIMULATOR.value, _ENV.value, _DATASET.value, _DATA_DIR.value)
    simulator = Simulator.load(path)
    members = int(simulator.validation_loss.shape[0])
    steps = _MAX_STEPS.value or env.max_episode_steps
    identity = {"bench": "planner_episodes", "env": _ENV.value, "simulator": path,
                "steps": steps, "seed": _SEED.value}
    done = done_pairs(_OUT.value, identity)
    covariates = env.test_agents
    for name, (planner, fraction) in planners.items():
        for agent in agents:
            if (name, agent) in done:
                print(f"{name} agent {agent}: recorded, skipped", flush=True)
                continue
            start = time.perf_counter()
            returns = evaluation.run_episodes(
                jax.random.fold_in(jax.random.PRNGKey(_SEED.value), agent), planner,
                simulator_dynamics_for_agent(simulator, [agent]), env,
                covariates[agent:agent + 1], 1, max_steps=steps)
            seconds = time.perf_counter() - start
            row = {**identity, "planner": name, "budget_fraction": fraction,
                   "model_evaluations": sequences_per_plan(planner) * planner.config.horizon
                   * members, "agent": agent,
                   "covariates": [float(c) for c in covariates[agent]],
                   "episode_return": round(float(np.asarray(returns)[0, 0]), 2),
                   "seconds": round(seconds, 1), "seconds_per_step": round(seconds / steps, 4),
                   **machine()}
            append_line(_OUT.value, row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
