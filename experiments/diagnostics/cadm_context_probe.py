"""What CaDM's learned context knows about an agent's hidden parameters.

For a run's trained CaDM (`<run_dir>/<env>/<dataset>/<method>_trial0.msgpack`,
from `python -m experiments.run ... --methods=vanilla_cadm`), each agent's
context is averaged over the steps of its logged trajectory that have at least
`--min_history` transitions of history; a linear map from that mean context to
each covariate is fitted on agents 100..N-1 and scored (R²) on agents 5..99.

    python -m experiments.diagnostics.cadm_context_probe --env=mountaincar --dataset=random \
        [--preset=quick] [--run_dir=runs/quick] [--method=vanilla_cadm] [--record | --out=FILE.json]

The JSON goes to runs/diagnostics/<preset>/<env>/<dataset>/<method>_context_probe.json
by default, beside the record's cell with --record.

On MountainCar the context sees Δs and actions only, never the position that
multiplies gravity in the dynamics (Δv = F·(a − 1) − g·cos 3x): over 10 small
steps it can pin down g·cos 3x, not g.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from sklearn.linear_model import LinearRegression

import envs
from experiments import diagnostics
from experiments.datagen import datasets
from persim_jax.methods import cadm

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined when run as a script only)."""
    flags.DEFINE_string("env", "mountaincar", "Environment.")
    flags.DEFINE_string("dataset", "random", "Dataset.")
    flags.DEFINE_enum("preset", "quick", ["quick", "paper"], "The run's preset: the default "
                      "--run_dir (runs/<preset>) and the record's cell --record writes into.")
    flags.DEFINE_string("run_dir", None, "The run's --out_dir (default: runs/<preset>).")
    flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
    flags.DEFINE_integer("num_agents", datasets.NUM_AGENTS, "Agents in the dataset (paper: 500).")
    flags.DEFINE_enum("method", "vanilla_cadm", ["vanilla_cadm", "pe_ts_cadm"], "Which CaDM.")
    flags.DEFINE_integer("min_history", 5, "Transitions of history a step needs.")
    diagnostics.define_output_flags()


def agent_contexts(model: cadm.CaDMModel, transitions, min_history: int) -> np.ndarray:
    """(N, C) each agent's mean context (member 0)."""
    data = cadm.pair_data(transitions, model.config)
    order, _ = cadm.path_rows(transitions)
    agent = np.asarray(transitions.agent_id)[order]
    encoder = jax.tree.map(lambda leaf: leaf[0], model.params["members"]["encoder"])
    rows = jnp.arange(data.obs.shape[0])
    contexts = np.concatenate([
        np.asarray(cadm.encode_context(encoder, cadm.gather_history(data, chunk)))
        for chunk in jnp.array_split(rows, max(1, len(rows) // 50_000))])
    enough = np.asarray(data.history[:, min_history - 1] >= 0)
    return np.stack([contexts[(agent == a) & enough].mean(0)
                     for a in range(transitions.num_agents)])


def probe(env, contexts: np.ndarray, covariates: np.ndarray) -> dict:
    """A linear map from the mean context (N, C) to each covariate of
    `covariates` (N, P), fitted on agents 100..N-1, scored (R²) there and on
    agents 5..99: {"probe_agents", "held_out_agents", "r2": {name: {"fit",
    "held_out"}}}."""
    ok = np.all(np.isfinite(contexts), axis=1)
    fit_rows = np.flatnonzero(ok & (np.arange(len(ok)) >= 100))
    test_rows = np.flatnonzero(ok & (np.arange(len(ok)) >= 5) & (np.arange(len(ok)) < 100))
    result = {"probe_agents": len(fit_rows), "held_out_agents": len(test_rows), "r2": {}}
    for index, name in enumerate(env.agents.names):
        fitted = LinearRegression().fit(contexts[fit_rows], covariates[fit_rows, index])
        result["r2"][name] = {
            "fit": round(float(fitted.score(contexts[fit_rows], covariates[fit_rows, index])), 4),
            "held_out": round(float(fitted.score(contexts[test_rows],
                                                 covariates[test_rows, index])), 4)}
    return result


def main(argv):
    del argv
    if FLAGS.num_agents <= 100:
        raise app.UsageError(f"--num_agents: the probe fits on agents 100..N-1 and scores on "
                             f"5..99, so N must exceed 100; got {FLAGS.num_agents}")
    env = envs.make(FLAGS.env)
    run_dir = FLAGS.run_dir or os.path.join("runs", FLAGS.preset)
    path = os.path.join(run_dir, FLAGS.env, FLAGS.dataset, f"{FLAGS.method}_trial0.msgpack")
    if not os.path.exists(path):
        raise app.UsageError(f"--run_dir: no such file: {path} (run experiments.run with "
                             f"--methods={FLAGS.method} first)")
    model = cadm.CaDMModel.load(path)
    transitions, _ = datasets.load_or_generate(FLAGS.env, FLAGS.dataset, data_dir=FLAGS.data_dir,
                                               seed=0, num_agents=FLAGS.num_agents)
    contexts = agent_contexts(model, transitions, FLAGS.min_history)
    result = {"env": FLAGS.env, "dataset": FLAGS.dataset, "method": FLAGS.method,
              **probe(env, contexts, np.asarray(transitions.covariates))}
    print(json.dumps(result))
    out = diagnostics.output_path(f"{FLAGS.method}_context_probe.json", FLAGS.env, FLAGS.dataset,
                                  out=FLAGS.out, record=FLAGS.record, preset=FLAGS.preset)
    diagnostics.write_json(out, result, final_newline=False)


if __name__ == "__main__":
    define_flags()
    app.run(main)
