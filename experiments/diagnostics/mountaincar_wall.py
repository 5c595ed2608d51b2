"""How much of a MountainCar simulator's prediction error is the left wall.

MountainCar's physics clamps the position at −1.2 and zeroes a negative
velocity there: a discontinuity that a smooth dynamics model does not
reproduce. This takes the prediction protocol's scored windows (10 warm-up +
50 open-loop steps of the test policy in each test agent's true physics,
`--episodes` episodes), splits them by whether the car reaches the wall inside
the window, and reports a recorded simulator's RMSE on each part, with how many logged
transitions reach the wall (what the model could learn of it).

    python -m experiments.diagnostics.mountaincar_wall --dataset=random \
        [--simulator=runs/quick/mountaincar/random/simulator_trial0.msgpack] \
        [--episodes=60] [--record | --out=FILE.json]

The JSON goes to runs/diagnostics/quick/mountaincar/<dataset>/mountaincar_wall.json
by default, beside the quick record's cell with --record.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags

import envs
from envs.mountaincar import EnvParams
from experiments import diagnostics
from experiments.datagen import datasets, policies
from persim_jax import evaluation
from persim_jax.persim.simulator import Simulator

FLAGS = flags.FLAGS
WALL = EnvParams().min_position


def define_flags() -> None:
    """The CLI's flags (defined when run as a script only)."""
    flags.DEFINE_string("dataset", "random", "Dataset.")
    flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
    flags.DEFINE_string("simulator", None, "A trained PerSim simulator (default: "
                        "runs/quick/mountaincar/<dataset>/simulator_trial0.msgpack).")
    flags.DEFINE_integer("episodes", 60, "Test-policy episodes per test agent.")
    flags.DEFINE_integer("seed", 0, "Seed of the episodes (and of the dataset).")
    flags.DEFINE_integer("num_agents", datasets.NUM_AGENTS, "Agents in the dataset (paper: 500).")
    diagnostics.define_output_flags()


def split_by_wall(true: np.ndarray, predicted: np.ndarray, valid: np.ndarray) -> dict:
    """Windows `true`, `predicted` (E, W, 2) with `valid` (E, W): the share
    that reach the wall and the mean window RMSE with and without it (the
    protocol's per-window RMSE over the valid states; None for an empty part)."""
    errors, walls = [], []
    for t, p, v in zip(true, predicted, valid):
        errors.append(float(np.sqrt(np.mean((t[v] - p[v]) ** 2))))
        walls.append(bool(np.any(t[v][:, 0] <= WALL + 1e-6)))
    errors, walls = np.asarray(errors), np.asarray(walls)

    def mean(part):
        return round(float(part.mean()), 5) if part.size else None

    return {"windows": int(len(errors)), "wall_fraction": round(float(walls.mean()), 3),
            "rmse": mean(errors), "rmse_with_wall": mean(errors[walls]),
            "rmse_without_wall": mean(errors[~walls])}


def windows(simulator: Simulator, env, covariates: np.ndarray, episodes: int, seed: int):
    """(true, predicted, valid): (A, E, W, 2), (A, E, W, 2), (A, E, W), the
    protocol's windows with the simulator's member-mean open loop."""
    policy = policies.test_policy(env)
    agent_ids = np.arange(len(covariates))
    parts = [evaluation.prediction_trajectories(key, simulator, env, policy, covariates,
                                                agent_ids=agent_ids)
             for key in jax.random.split(jax.random.PRNGKey(seed), episodes)]
    stack = lambda name: np.stack([part[name] for part in parts], axis=1)  # noqa: E731
    return stack("true"), stack("predicted"), stack("valid")


def main(argv):
    del argv
    path = FLAGS.simulator or os.path.join("runs", "quick", "mountaincar", FLAGS.dataset,
                                           "simulator_trial0.msgpack")
    if not os.path.exists(path):
        raise app.UsageError(f"--simulator: no such file: {path} (run experiments.run first)")
    env = envs.make("mountaincar")
    transitions, _ = datasets.load_or_generate("mountaincar", FLAGS.dataset,
                                               data_dir=FLAGS.data_dir, seed=FLAGS.seed,
                                               num_agents=FLAGS.num_agents)
    simulator = Simulator.load(path)
    count = len(env.test_agents)
    covariates = np.asarray(transitions.covariates)[:count]
    true, predicted, valid = windows(simulator, env, covariates, FLAGS.episodes, FLAGS.seed)
    # What the model could learn of the wall: the logged transitions that reach it.
    at_wall = np.asarray(transitions.next_obs)[:, 0] <= WALL + 1e-6
    agent_id = np.asarray(transitions.agent_id)
    result = {"dataset": FLAGS.dataset, "simulator": path, "episodes": FLAGS.episodes,
              "wall": WALL, "logged_transitions": int(len(at_wall)),
              "logged_at_wall": int(at_wall.sum()),
              "agents_logged_at_wall": int(len(np.unique(agent_id[at_wall]))), "agents": []}
    print(f"{result['logged_at_wall']} of {result['logged_transitions']} logged transitions "
          f"reach the wall, from {result['agents_logged_at_wall']} of {transitions.num_agents} "
          "agents", flush=True)
    for a in range(count):
        row = {"gravity": round(float(covariates[a][0]), 6),
               "logged_at_wall": int(at_wall[agent_id == a].sum()),
               **split_by_wall(true[a], predicted[a], valid[a])}
        result["agents"].append(row)
        print(f"agent {a} (gravity {row['gravity']}): {row['wall_fraction']:.0%} of the windows "
              f"reach the wall; RMSE {row['rmse']} (with the wall {row['rmse_with_wall']}, "
              f"without {row['rmse_without_wall']})", flush=True)
    out = diagnostics.output_path("mountaincar_wall.json", "mountaincar", FLAGS.dataset,
                                  out=FLAGS.out, record=FLAGS.record)
    diagnostics.write_json(out, result)
    print(f"[mountaincar_wall] {out}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
