"""What CaDM's learned context knows about an agent's hidden parameters.

For a run's trained CaDM (`<run_dir>/<env>/<dataset>/<method>_trial0.msgpack`,
from `python -m experiments.run ... --methods=vanilla_cadm`), each agent's
context is averaged over the steps of its logged trajectory that have at least
`--min_history` transitions of history; a linear map from that mean context to
each covariate is fitted on agents 100..N-1 and scored (R²) on agents 5..99.

    python -m experiments.cadm_context_probe --env=mountaincar --dataset=random \
        [--run_dir=runs/quick] [--method=vanilla_cadm] [--out=FILE.json]

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
from experiments.datagen import datasets
from persim_jax import cadm
from persim_jax.data import atomic_write

_ENV = flags.DEFINE_string("env", "mountaincar", "Environment.")
_DATASET = flags.DEFINE_string("dataset", "random", "Dataset.")
_RUN_DIR = flags.DEFINE_string("run_dir", "runs/quick", "The run's --out_dir.")
_DATA_DIR = flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
_METHOD = flags.DEFINE_enum("method", "vanilla_cadm", ["vanilla_cadm", "pe_ts_cadm"],
                            "Which CaDM.")
_MIN_HISTORY = flags.DEFINE_integer("min_history", 5, "Transitions of history a step needs.")
_OUT = flags.DEFINE_string("out", None, "JSON output (default: beside the run's results).")


def agent_contexts(model: cadm.CaDMModel, transitions, min_history: int) -> np.ndarray:
    """(N, C) each agent's mean context (member 0)."""
    data = cadm.pair_data(transitions, model.config)
    order, _ = cadm.path_rows(transitions)
    agent = np.asarray(transitions.agent_id)[order]
    encoder = jax.tree.map(lambda leaf: leaf[0], model.params["members"]["encoder"])
    rows = jnp.arange(data.obs.shape[0])
    contexts = np.concatenate([
        np.asarray(cadm.encode_context(encoder, cadm._gather_history(data, chunk)))
        for chunk in jnp.array_split(rows, max(1, len(rows) // 50_000))])
    enough = np.asarray(data.history[:, min_history - 1] >= 0)
    return np.stack([contexts[(agent == a) & enough].mean(0)
                     for a in range(transitions.num_agents)])


def main(argv):
    del argv
    env = envs.make(_ENV.value)
    directory = os.path.join(_RUN_DIR.value, _ENV.value, _DATASET.value)
    model = cadm.CaDMModel.load(os.path.join(directory, f"{_METHOD.value}_trial0.msgpack"))
    transitions, _ = datasets.load_or_generate(_ENV.value, _DATASET.value,
                                               data_dir=_DATA_DIR.value, seed=0)
    contexts = agent_contexts(model, transitions, _MIN_HISTORY.value)
    covariates = np.asarray(transitions.covariates)
    ok = np.all(np.isfinite(contexts), axis=1)
    fit_rows = np.flatnonzero(ok & (np.arange(len(ok)) >= 100))
    test_rows = np.flatnonzero(ok & (np.arange(len(ok)) >= 5) & (np.arange(len(ok)) < 100))
    result = {"env": _ENV.value, "dataset": _DATASET.value, "method": _METHOD.value,
              "probe_agents": len(fit_rows), "held_out_agents": len(test_rows), "r2": {}}
    for index, name in enumerate(env.agents.names):
        probe = LinearRegression().fit(contexts[fit_rows], covariates[fit_rows, index])
        result["r2"][name] = {
            "fit": round(float(probe.score(contexts[fit_rows], covariates[fit_rows, index])), 4),
            "held_out": round(float(probe.score(contexts[test_rows],
                                                covariates[test_rows, index])), 4)}
    print(json.dumps(result))
    out = _OUT.value or os.path.join(directory, f"{_METHOD.value}_context_probe.json")
    with atomic_write(out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    app.run(main)
