"""What closes HalfCheetah's reward gap: PerSim's MPC reward on the 5 test
agents under planner and simulator variants of the quick preset.

    python -m benchmarks.halfcheetah_ablation [--dataset=random] [--episodes=3]
        [--variants=quick,samples100,horizon20,rounds5,epochs30] [--table]

Each variant is `python -m experiments.run --env=halfcheetah --preset=quick
--methods=persim --episodes=E --epochs=10` (`BASE`) plus its own flags
(`VARIANTS`), run as a process of its own in one run folder (`--out_dir`),
so variants that share a simulator reuse its dataset, training and
prediction stages, and every variant meets the same episode keys (the run's
reward keys do not depend on the planner). After each variant one JSON line
is appended to `--out`: the variant, its planner and simulator settings, the
model evaluations per plan (samples × horizon × rounds × members), every
(agent, episode) return, the prediction RMSE of its simulator, and the
seconds of its reward stage per episode (the `true_env` variant also runs
True env + MPC, so its seconds are both methods'; its returns are
`true_env_mpc_returns`). Variants already in `--out` for the same dataset,
episodes and seed are skipped, so an interrupted sweep resumes.

`--table [--reference=VARIANT] [--table_datasets=D,...]` prints the recorded
rows as a Markdown table, each row's mean against the reference variant's
(default quick) on the same dataset; runs nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags

from experiments import intervals
from persim_jax.data import atomic_write

# Every variant starts from the quick preset as it was when the ablation
# began: CEM 50 samples × horizon 10 × 3 rounds, 10 elites; 100 agents, 10
# epochs. (The preset now trains 300 agents for 30 epochs, the
# `agents300_epochs30` variant; the flags below restore the old simulator
# and a variant's own flags come after them.)
BASE = ["--num_agents=100", "--epochs=10"]

# Variant -> experiments.run flags on top of BASE.
VARIANTS = {
    "quick": [],
    "samples100": ["--candidates=100", "--cem_elites=20"],
    "horizon20": ["--horizon=20"],
    "rounds5": ["--cem_rounds=4"],
    "epochs30": ["--epochs=30"],
    "agents300": ["--num_agents=300"],
    # More data and more training together, the direction of the paper's 500
    # agents and 300 epochs.
    "agents300_epochs30": ["--num_agents=300", "--epochs=30"],
    # Twice the training of the preset (300 agents, 30 epochs since 2026-12-08).
    "agents300_epochs60": ["--num_agents=300", "--epochs=60"],
    "samples100_horizon20": ["--candidates=100", "--cem_elites=20", "--horizon=20"],
    "paper_cem": ["--candidates=200", "--cem_elites=50", "--horizon=30", "--cem_rounds=5"],
    # The members' mean return instead of the paper's worst case: does the
    # pessimism keep an agent standing still?
    "aggregation_mean": ["--aggregation=mean"],
    "epochs30_mean": ["--epochs=30", "--aggregation=mean"],
    # The quick planner on each agent's true physics (MuJoCo's C simulator on
    # a CPU): what the planner earns when the simulator is perfect.
    "true_env": ["--methods=persim,true_env_mpc"],
}

_DATASET = flags.DEFINE_string("dataset", "random", "HalfCheetah dataset.")
_VARIANTS = flags.DEFINE_list("variants", ["quick", "samples100", "horizon20", "rounds5",
                                           "epochs30"], f"Of {', '.join(VARIANTS)}.")
_EPISODES = flags.DEFINE_integer("episodes", 3, "MPC episodes per test agent.")
_SEED = flags.DEFINE_integer("seed", 0, "The run's seed (dataset, training, episode keys).")
_OUT_DIR = flags.DEFINE_string("out_dir", os.path.join("runs", "halfcheetah_ablation"),
                               "The run folder the variants share.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data", "Dataset cache.")
_OUT = flags.DEFINE_string("out", os.path.join("benchmarks", "results",
                                               "halfcheetah_ablation.jsonl"), "JSON lines.")
_TABLE = flags.DEFINE_bool("table", False, "Print the recorded rows as a Markdown table.")
_REFERENCE = flags.DEFINE_string("reference", "quick", "--table: the variant each row's mean is "
                                 "compared with (same dataset, seed and episodes).")
_TABLE_DATASETS = flags.DEFINE_list("table_datasets", None, "--table: only these datasets' rows "
                                    "(default: every row).")


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def row_of(variant: str, results: dict) -> dict:
    """The JSON line of one finished variant from its run's results.json."""
    reward = results["reward"]
    planner = reward["planner"]
    config = results["config"]
    returns = np.asarray(reward["persim"]["returns"], np.float64)     # (trials, agents, episodes)
    members = config["ensemble_size"]
    evaluations = (planner["num_samples"] * planner["horizon"] * (planner["num_rounds"] + 1)
                   * members)
    episodes = returns.shape[1] * returns.shape[2]
    return {
        "bench": "halfcheetah_ablation", "variant": variant, "flags": VARIANTS[variant],
        "dataset": results["dataset"], "seed": results["seed"], "episodes": returns.shape[2],
        "planner": {key: planner[key] for key in ("num_samples", "horizon", "num_rounds",
                                                  "num_elites", "discount", "aggregation")},
        "simulator": {key: config[key] for key in ("num_agents", "epochs", "ensemble_size")},
        "model_evaluations_per_plan": evaluations,
        "returns": returns[0].tolist(),
        "true_env_mpc_returns": (np.asarray(reward["true_env_mpc"]["returns"])[0].tolist()
                                 if reward.get("true_env_mpc") else None),
        "agent_means": returns[0].mean(axis=1).tolist(),
        "mean": float(returns[0].mean()),
        # results.json's "prediction" is PerSim's row: per-agent mean RMSE.
        "prediction_rmse": (float(np.mean(results["prediction"]["rmse"]))
                            if results.get("prediction") else None),
        "reward_seconds_per_episode": results["timing_s"]["reward"] / episodes,
        "devices": results.get("devices"),
        "libraries": results.get("libraries"),
    }


def against(row: dict, rows: list[dict], reference: str = "quick") -> str:
    """`row`'s mean − the `reference` variant's (same dataset, seed and
    episodes) with the 95 % bootstrap interval over episodes (one trained
    simulator each side: no training noise), as "38.6 [11.7, 66.0]"; –
    without one."""
    quick = next((r for r in rows if r["variant"] == reference and all(
        r[key] == row[key] for key in ("dataset", "seed", "episodes"))), None)
    if quick is None or row is quick:
        return "–"
    if row["returns"] == quick["returns"]:
        return "0 (the same episodes)"
    found = intervals.bootstrap_difference(np.asarray(row["returns"])[None],
                                           np.asarray(quick["returns"])[None],
                                           num_resamples=10_000)
    if found.low is None:
        return f"{found.difference:.1f}"
    return f"{found.difference:.1f} [{found.low:.1f}, {found.high:.1f}]"


def table(rows: list[dict], reference: str = "quick") -> str:
    lines = ["| variant | samples × horizon × rounds | simulator (agents, epochs) | model evaluations "
             f"per plan | agent 0 | agent 1 | agent 2 | agent 3 | agent 4 | mean | mean − {reference} "
             "[95 %] | True env + MPC mean | PerSim prediction RMSE | s / episode |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        planner, simulator = row["planner"], row["simulator"]
        agents = " | ".join(f"{value:.1f}" for value in row["agent_means"])
        true_env = ("–" if row.get("true_env_mpc_returns") is None
                    else f"{np.mean(row['true_env_mpc_returns']):.1f}")
        # The paper plans on the members' worst case; another aggregation is named.
        aggregation = ("" if planner["aggregation"] == "min"
                       else f", members’ {planner['aggregation']}")
        lines.append(
            f"| {row['variant']} ({row['dataset']}, {row['episodes']} ep.) | "
            f"{planner['num_samples']} × {planner['horizon']} × {planner['num_rounds'] + 1}"
            f"{aggregation} | "
            f"{simulator['num_agents']}, {simulator['epochs']} | "
            f"{row['model_evaluations_per_plan']:,} | {agents} | {row['mean']:.1f} | "
            f"{against(row, rows, reference)} | {true_env} | "
            f"{'–' if row.get('prediction_rmse') is None else format(row['prediction_rmse'], '.3f')} | "
            f"{row['reward_seconds_per_episode']:.0f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if _TABLE.value:
        rows = [r for r in read_rows(_OUT.value)
                if _TABLE_DATASETS.value is None or r["dataset"] in _TABLE_DATASETS.value]
        print(table(rows, _REFERENCE.value))
        return
    unknown = [name for name in _VARIANTS.value if name not in VARIANTS]
    if unknown:
        raise app.UsageError(f"--variants: unknown {', '.join(unknown)}; valid: "
                             f"{', '.join(VARIANTS)}")
    for variant in _VARIANTS.value:
        done = {(r["variant"], r["dataset"], r["episodes"], r["seed"])
                for r in read_rows(_OUT.value)}
        if (variant, _DATASET.value, _EPISODES.value, _SEED.value) in done:
            print(f"[{variant}] recorded; skipped", flush=True)
            continue
        methods = [] if any(f.startswith("--methods=") for f in VARIANTS[variant]) else \
            ["--methods=persim"]
        command = [sys.executable, "-m", "experiments.run", "--env=halfcheetah",
                   f"--dataset={_DATASET.value}", "--preset=quick", *methods,
                   f"--episodes={_EPISODES.value}", f"--seed={_SEED.value}", "--skip=plots",
                   f"--out_dir={_OUT_DIR.value}", f"--data_dir={_DATA_DIR.value}",
                   *BASE, *VARIANTS[variant]]
        print(f"[{variant}] {' '.join(command[1:])}", flush=True)
        subprocess.check_call(command)
        path = os.path.join(_OUT_DIR.value, "halfcheetah", _DATASET.value, "results.json")
        with open(path, encoding="utf-8") as handle:
            row = row_of(variant, json.load(handle))
        lines = [json.dumps(r) for r in read_rows(_OUT.value)] + [json.dumps(row)]
        with atomic_write(_OUT.value, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        if row["true_env_mpc_returns"] is not None:
            print(f"[{variant}] True env + MPC mean "
                  f"{np.mean(row['true_env_mpc_returns']):.1f}", flush=True)
        print(f"[{variant}] mean {row['mean']:.1f}; agents "
              f"{', '.join(f'{v:.1f}' for v in row['agent_means'])}", flush=True)


if __name__ == "__main__":
    app.run(main)
