"""How good a plan each continuous planner finds for its model evaluations:
the paper's CEM against iCEM at a fraction of its budget.

    python -m benchmarks.planner_quality [--env=halfcheetah] [--simulator=PATH]
        [--data_dir=DIR] [--dataset=random] [--states=20] [--fractions=0.5,0.25,0.125]

On a trained simulator (PATH: a `simulator_trial*.msgpack`; default: the
quick run's, `runs/quick/<env>/<dataset>/simulator_trial0.msgpack`, trained
first with `python -m experiments.run --preset=quick --skip=...` when it is
missing) and `--states` start states taken from the test agents' logged
trajectories (spread over each, under that agent's learned dynamics), every
planner plans once from each state with a cold start. A plan's value is the
objective of the sequence the planner would play (`Planner.sequence`: CEM's
last elite mean, iCEM's best sequence), scored the same way for all: the
paper's min over members of the discounted return. One JSON line per planner
and budget: `bench` ("planner_quality"), `planner` ("cem_paper" or "icem"),
`budget_fraction`, `model_evaluations` (per plan: sequences × horizon ×
members), `objective_mean`, `win_rate_vs_cem_paper` (fraction of states where
it finds at least the paper CEM's value), `seconds_per_plan`.

iCEM's size for a fraction f of the paper CEM's sequences (200 × 6 rounds):
the largest first population whose rounds (population shrinking by 1.25 per
round, 4 rounds, 10 elites, 30 % of them carried, the mean scored last) fit in
f · 1200 sequences.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import envs
from benchmarks.common import emit, machine, simulator_path
from experiments import config as config_lib
from experiments import paper
from experiments.datagen import datasets
from persim_jax import Simulator, planning
from persim_jax.dynamics import simulator_dynamics

_ENV = flags.DEFINE_string("env", "halfcheetah", "A continuous-action environment.")
_DATASET = flags.DEFINE_string("dataset", "random", "Dataset of the start states.")
_SIMULATOR = flags.DEFINE_string("simulator", None, "A trained simulator_trial*.msgpack.")
_DATA_DIR = flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
_STATES = flags.DEFINE_integer("states", 20, "Start states (spread over the 5 test agents).")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.5", "0.25", "0.125"],
                               "iCEM budgets as fractions of the paper CEM's.")
_SEED = flags.DEFINE_integer("seed", 0, "Planning keys.")

def start_states(transitions, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(agents (S,), states (S, D)): count states spread evenly over the
    logged trajectories of test agents 0..4 (round robin over the agents)."""
    agent_of = np.asarray(transitions.agent_id)
    agents, states = [], []
    for index in range(count):
        agent = index % 5
        rows = np.flatnonzero(agent_of == agent)
        step = (index // 5 + 0.5) / -(-count // 5)
        agents.append(agent)
        states.append(np.asarray(transitions.obs)[rows[int(step * len(rows))]])
    return np.asarray(agents), np.stack(states)


def measure(planner, objective_config, simulator, env, agents, states, seed: int):
    """(objective values (S,), seconds per plan) of `planner` from each state."""

    @jax.jit
    def one(key, agent, obs):
        dynamics = simulator_dynamics(simulator, agent)
        sequence, _ = planner.sequence(key, planner.init(), obs, dynamics)
        score = planning.score_sequences(dynamics, env.reward, env.terminated, obs,
                                         sequence[None], objective_config)
        return score[0]

    keys = jax.random.split(jax.random.PRNGKey(seed), len(states))
    jax.block_until_ready(one(keys[0], agents[0], states[0]))          # compile
    start = time.perf_counter()
    values = [float(one(k, a, s)) for k, a, s in zip(keys, agents, jnp.asarray(states))]
    return np.asarray(values), (time.perf_counter() - start) / len(states)


def main(argv):
    del argv
    env = envs.make(_ENV.value)
    if env.discrete_actions:
        raise app.UsageError(f"--env: {_ENV.value} has discrete actions; iCEM and CEM plan "
                             "continuous ones")
    settings = config_lib.resolve(_ENV.value, _DATASET.value, "quick")
    simulator = Simulator.load(simulator_path(_SIMULATOR.value, _ENV.value, _DATASET.value,
                                              _DATA_DIR.value))
    transitions, _ = datasets.load_or_generate(_ENV.value, _DATASET.value,
                                               data_dir=_DATA_DIR.value, seed=0,
                                               num_agents=settings.num_agents)
    agents, states = start_states(transitions, _STATES.value)
    cem = paper.planner_config(env)
    members = int(simulator.validation_loss.shape[0])
    reference, seconds = measure(planning.cem(cem, env.reward, env.terminated), cem, simulator,
                                 env, agents, states, _SEED.value)
    sequences = cem.num_samples * (cem.num_rounds + 1)
    base = {"bench": "planner_quality", "env": _ENV.value, "states": len(states), **machine()}
    emit({**base, "planner": "cem_paper", "budget_fraction": 1.0,
          "model_evaluations": sequences * cem.horizon * members,
          "objective_mean": round(float(reference.mean()), 3), "win_rate_vs_cem_paper": 1.0,
          "seconds_per_plan": round(seconds, 3)})
    for fraction in map(float, _FRACTIONS.value):
        config = paper.icem_config(env, fraction)
        values, seconds = measure(planning.icem(config, env.reward, env.terminated), cem,
                                  simulator, env, agents, states, _SEED.value)
        emit({**base, "planner": "icem", "budget_fraction": fraction,
              "num_samples": config.num_samples,
              "model_evaluations": config.sequences_per_plan() * config.horizon * members,
              "objective_mean": round(float(values.mean()), 3),
              "win_rate_vs_cem_paper": round(float(np.mean(values >= reference)), 3),
              "seconds_per_plan": round(seconds, 3)})


if __name__ == "__main__":
    app.run(main)
