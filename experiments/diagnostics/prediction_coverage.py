"""Where the prediction protocol's test policy takes each test agent, against
where that agent's one logged trajectory went.

PerSim learns an agent's dynamics from its one trajectory; the prediction
error is scored on episodes of the test policy (trained on the default
agent). For each test agent this reports the box (per-dimension min and max)
of its logged states, the box of the states the test policy visits in the
protocol's scored windows (10 warm-up + 50 steps, `--episodes` episodes of the
true physics), and the fraction of those states inside the logged box: a
small fraction means the prediction test asks the model to extrapolate.

    python -m experiments.diagnostics.prediction_coverage --env=mountaincar --dataset=pure \
        [--episodes=50] [--record | --out=FILE.json]

No trained model is needed: the states come from the true env. The JSON goes
to runs/diagnostics/quick/<env>/<dataset>/prediction_coverage.json by default,
beside the quick record's cell with --record.
"""

from __future__ import annotations


import jax
import numpy as np
from absl import app, flags

import envs
from experiments import diagnostics
from experiments.datagen import datasets, policies
from persim_jax import evaluation

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined when run as a script, so that importing the
    module for `coverage` defines none)."""
    flags.DEFINE_string("env", "mountaincar", "Environment.")
    flags.DEFINE_string("dataset", "pure", "Dataset.")
    flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
    flags.DEFINE_integer("episodes", 50, "Test-policy episodes per test agent.")
    flags.DEFINE_integer("seed", 0, "Seed of the episodes (and of the dataset).")
    flags.DEFINE_integer("num_agents", datasets.NUM_AGENTS, "Agents in the dataset (paper: 500).")
    diagnostics.define_output_flags()


def coverage(logged: np.ndarray, visited: np.ndarray) -> dict:
    """Boxes of `logged` (T, D) and `visited` (V, D) states, and the fraction
    of visited states inside the logged box (every dimension within its
    logged min..max)."""
    low, high = logged.min(0), logged.max(0)
    inside = np.all((visited >= low) & (visited <= high), axis=1)

    def rounded(values):
        return np.asarray(values, np.float64).round(4).tolist()

    return {"logged_steps": int(len(logged)),
            "logged_low": rounded(low), "logged_high": rounded(high),
            "visited_low": rounded(visited.min(0)), "visited_high": rounded(visited.max(0)),
            "inside_fraction": round(float(inside.mean()), 3)}


def visited_states(env, covariates: np.ndarray, episodes: int, seed: int) -> list[np.ndarray]:
    """Per test agent, (V, D) the valid states of the protocol's scored windows
    over `episodes` episodes of the test policy in the true physics."""
    policy = policies.test_policy(env)
    dynamics = evaluation.true_env_dynamics_for_agent(env)
    states = [[] for _ in range(len(covariates))]
    for key in jax.random.split(jax.random.PRNGKey(seed), episodes):
        window = evaluation.prediction_trajectories(key, dynamics, env, policy, covariates)
        for agent, (true, valid) in enumerate(zip(window["true"], window["valid"])):
            states[agent].append(true[valid])
    return [np.concatenate(rows) for rows in states]


def main(argv):
    del argv
    env = envs.make(FLAGS.env)
    transitions, _ = datasets.load_or_generate(FLAGS.env, FLAGS.dataset,
                                               data_dir=FLAGS.data_dir, seed=FLAGS.seed,
                                               num_agents=FLAGS.num_agents)
    count = len(env.test_agents)
    covariates = np.asarray(transitions.covariates)[:count]
    visited = visited_states(env, covariates, FLAGS.episodes, FLAGS.seed)
    obs, agent_id = np.asarray(transitions.obs), np.asarray(transitions.agent_id)
    result = {"env": FLAGS.env, "dataset": FLAGS.dataset, "episodes": FLAGS.episodes,
              "state_names": list(transitions.state_names or []),
              "agents": [{"covariates": np.asarray(covariates[a], np.float64).round(6).tolist(),
                          **coverage(obs[agent_id == a], visited[a])} for a in range(count)]}
    for a, row in enumerate(result["agents"]):
        print(f"agent {a} {row['covariates']}: logged {row['logged_steps']} steps, "
              f"{row['inside_fraction']:.0%} of the test policy's states inside their box",
              flush=True)
    out = diagnostics.output_path("prediction_coverage.json", FLAGS.env, FLAGS.dataset,
                                  out=FLAGS.out, record=FLAGS.record)
    diagnostics.write_json(out, result, final_newline=False)
    print(f"[prediction_coverage] {out}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
