"""What the paper preset would cost per reproduction cell, from the quick
preset's measured stage seconds.

Each stage record of a quick run (`<run_dir>/<env>/<dataset>/stages/*.json`,
written by `python -m experiments.reproduce --preset=quick`) is scaled by the
ratio of the work the paper preset does in that stage:

  * PerSim / population / per-agent training: trials × epochs;
  * BCQ training: trials × iterations;
  * CaDM training: trials × iterations × (context, transition) pairs per fit
    (the paper: every pair, ~ the dataset's transitions; quick: 5e4);
  * MPC reward: episodes × trials (True env + MPC does not train: episodes
    only), PE-TS also × particles; BCQ episodes: policy episodes × trials;
  * prediction: episodes × trials.

Linear scaling ignores compilation (paid once) and batching gains, and the
quick stages were timed on a shared machine, so these are estimates, not
measurements; `benchmarks/RESULTS.md` compares one against a measured paper
cell.

    python -m benchmarks.reproduction_cost [--run_dir=runs/quick] [--envs=cartpole,mountaincar]
"""

from __future__ import annotations

import glob
import json
import os

from absl import app, flags

from experiments import paper, report
from experiments.datagen.datasets import DATASETS
from experiments.reproduce import RECORD_DIR, recorded

FLAGS = flags.FLAGS

GROUPS = {
    "PerSim + True env + MPC": ("persim", "true_env_mpc"),
    "population + per-agent": ("population", "per_agent"),
    "BCQ-P + BCQ-A": ("bcq_p", "bcq_a"),
    "Vanilla + PE-TS CaDM": ("vanilla_cadm", "pe_ts_cadm"),
}


def scale(env: str, stage: str, method: str, transitions: float) -> float:
    """Paper-preset work / quick-preset work of one stage of `method`."""
    quick, full = paper.PRESETS["quick"][env], paper.PRESETS["paper"][env]
    trials = full["trials"] / quick["trials"]
    if stage == "train":
        if method.startswith("bcq"):
            return trials * full["bcq_iterations"] / quick["bcq_iterations"]
        if method.endswith("cadm"):
            pairs = full["cadm_pairs_per_epoch"] or transitions
            return (trials * full["cadm_iterations"] * pairs
                    / (quick["cadm_iterations"] * (quick["cadm_pairs_per_epoch"] or transitions)))
        return trials * full["epochs"] / quick["epochs"]
    if stage == "reward":
        if method.startswith("bcq"):
            return trials * full["policy_episodes"] / quick["policy_episodes"]
        factor = full["episodes"] / quick["episodes"] * (1 if method == "true_env_mpc" else trials)
        if method == "pe_ts_cadm":
            factor *= full["cadm_particles"] / quick["cadm_particles"]
        return factor
    return trials * full["prediction_episodes"] / quick["prediction_episodes"]


def cell_estimate(env: str, dataset: str, run_dir: str) -> dict | None:
    """{group: estimated paper-preset hours} for one recorded quick cell, with
    its measured quick seconds; None when the cell or its stages are missing."""
    results = recorded(RECORD_DIR, "quick", env, dataset)
    stages = glob.glob(os.path.join(run_dir, env, dataset, "stages", "*.json"))
    if results is None or not stages:
        return None
    transitions = results["dataset_stats"]["mean_length"] * results["config"]["num_agents"]
    hours = dict.fromkeys(GROUPS, 0.0)
    for path in stages:
        stage, rest = os.path.basename(path)[:-len(".json")].split("_", 1)
        method = rest.split("_trial")[0]
        with open(path, encoding="utf-8") as handle:
            seconds = json.load(handle).get("seconds", 0.0)
        for group, names in GROUPS.items():
            if method in names:
                hours[group] += seconds * scale(env, stage, method, transitions) / 3600
    quick = sum(v for k, v in results["timing_s"].items() if k != "total")
    return {"quick_seconds": quick, "hours": hours}


def main(argv):
    del argv
    header = ["cell", "quick, measured (s)", *[f"paper: {g}" for g in GROUPS], "paper: all"]
    rows, total = [], 0.0
    for env in FLAGS.envs:
        for dataset in DATASETS:
            estimate = cell_estimate(env, dataset, FLAGS.run_dir)
            if estimate is None:
                continue
            hours = estimate["hours"]
            total += sum(hours.values())
            rows.append([f"{paper.display_name(env)} / {report.dataset_label(dataset)}",
                         f"{estimate['quick_seconds']:.0f}",
                         *[f"{h:.1f} h" for h in hours.values()], f"{sum(hours.values()):.0f} h"])
    print(report.markdown_table(header, rows))
    print(f"\nIn all: {total:.0f} h for {len(rows)} cells.")


def define_flags() -> None:
    """The CLI's flags (defined when run as a script, so that importing the
    module for `scale` defines none)."""
    flags.DEFINE_string("run_dir", "runs/quick", "The quick runs' --out_dir.")
    flags.DEFINE_list("envs", ["cartpole", "mountaincar"], "Environments.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
