"""Why the paper's BCQ-P scores -500 on MountainCar / random and ours does not.

PerSim's repository carries a BCQ (`rl_algorithm/bcq.py`, never called by its
`run.py`) whose target bootstraps on `done` instead of `not_done`:
y = r + γ · done · Q'(s', a*). This script trains BCQ-P on the quick preset's
MountainCar / random data (seed 0, 500 agents) both ways, with the harness's
keys and budget (5e4 iterations, 20 episodes per test agent), and writes the
test agents' mean returns:

    python -m experiments.diagnostics.bcq_bootstrap [--record | --out=FILE.json]

The JSON goes to runs/diagnostics/quick/mountaincar/random/bcq_bootstrap.json
by default; --record writes the record's
experiments/results/quick/mountaincar/random/bcq_bootstrap.json.

Bootstrapping on `done` leaves Q ≈ r almost everywhere (no value flows back
from the goal), so BCQ's action mask makes it imitate the logged actions:
random play on random data (-500), but sensible play on the pure datasets'
good logging policies, as the paper's BCQ rows show.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

import envs
from experiments import diagnostics
from experiments.datagen import datasets
from persim_jax import evaluation
from persim_jax.methods import bcq

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined when run as a script only)."""
    flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
    flags.DEFINE_integer("num_agents", datasets.NUM_AGENTS, "Agents in the dataset (paper: 500).")
    flags.DEFINE_integer("iterations", 50_000, "BCQ iterations.")
    flags.DEFINE_integer("episodes", 20, "Episodes per test agent.")
    diagnostics.define_output_flags()


def main(argv):
    del argv
    env = envs.make("mountaincar")
    transitions, _ = datasets.load_or_generate("mountaincar", "random", data_dir=FLAGS.data_dir,
                                               seed=0, num_agents=FLAGS.num_agents)
    covariates = np.asarray(transitions.covariates)[:5]
    done = np.asarray(transitions.done)
    results = {"iterations": FLAGS.iterations, "episodes": FLAGS.episodes,
               "test_agents": covariates.tolist()}
    # Flipping `done` turns our target y = r + γ·(1 − done)·Q' into theirs.
    for variant, logged_done in (("not_done (ours)", done), ("done (PerSim's copy)", ~done)):
        method = bcq.BCQP(bcq.BCQConfig(iterations=FLAGS.iterations))
        start = time.time()
        trained = method.train(transitions.replace(done=logged_done), method.key("train", 0))
        returns = evaluation.run_policy_episodes(
            method.key("reward", 0), method.policy_for_agent(trained, list(range(5))), env,
            covariates, FLAGS.episodes)
        results[variant] = {"mean": [round(float(x), 1) for x in returns.mean(axis=1)],
                            "seconds": round(time.time() - start, 1)}
        print(variant, results[variant], flush=True)
    out = diagnostics.output_path("bcq_bootstrap.json", "mountaincar", "random", out=FLAGS.out,
                                  record=FLAGS.record)
    diagnostics.write_json(out, results, final_newline=False)
    print(f"[bcq_bootstrap] {out}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
