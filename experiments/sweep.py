"""Sweep `experiments.run` over datasets x tensor ranks, and tabulate the results.

    python -m experiments.sweep --env=cartpole --datasets=pure,random --ranks=3,5 \\
        --preset=quick --out_dir=runs/sweep [--extra="--epochs=5 --candidates=100"]

Each configuration runs, one after the other, as
`python -m experiments.run --env=E --dataset=D --rank=R --preset=P
--out_dir=<out_dir>/rank<R> <extra>` (a failure stops the sweep), then
`<out_dir>/<env>_sweep.md` gets one row per configuration: the means over the
test agents of prediction RMSE, median R², PerSim reward and True env + MPC
reward, and the run's total time. run.py's own caching decides whether a
finished configuration is recomputed (pass --extra=--force to recompute).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys

from absl import app, flags

import envs
from experiments import paper
from persim_jax.data import atomic_write

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The sweep's flags, defined only when it runs as a program (so that
    importing this module beside `experiments.run`, which defines `--env` too,
    does not clash)."""
    flags.DEFINE_enum("env", paper.DEFAULT_ENV, list(envs.ENV_NAMES), "Environment.")
    flags.DEFINE_list("datasets", ["pure"], "Datasets, comma-separated.")
    flags.DEFINE_list("ranks", ["5"], "Tensor ranks r, comma-separated integers.")
    flags.DEFINE_enum("preset", "quick", ["quick", "paper"], "run.py's preset.")
    flags.DEFINE_string("out_dir", "runs/sweep", "Folder of the sweep's runs and table.")
    flags.DEFINE_string("extra", "", "More flags for every run.py call, e.g. "
                        "\"--epochs=5 --candidates=100\".")


def _mean(values) -> float | None:
    finite = [float(v) for v in (values or [])
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _fmt(x, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _total_seconds(results: dict) -> float | None:
    timing = results.get("timing_s") or {}
    if isinstance(timing.get("total"), (int, float)):
        return float(timing["total"])
    values = [v for v in timing.values() if isinstance(v, (int, float))]
    return float(sum(values)) if values else None


def sweep_table(rows: list[tuple[str, dict]]) -> str:
    """A Markdown table, one row per (label, results.json dict); every number
    is the mean over the test agents ("–" where the run skipped that stage)."""
    header = ["configuration", "prediction RMSE", "median R²", "PerSim reward",
              "True env + MPC reward", "total time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, results in rows:
        prediction = results.get("prediction") or {}
        reward = results.get("reward") or {}
        cells = [
            label,
            _fmt(_mean(prediction.get("rmse")), 4),
            _fmt(_mean(prediction.get("r2_median")), 3),
            _fmt(_mean((reward.get("persim") or {}).get("mean")), 1),
            _fmt(_mean((reward.get("true_env_mpc") or {}).get("mean")), 1),
            _fmt(_total_seconds(results), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_command(env: str, dataset: str, rank: int, preset: str, out_dir: str,
                extra: str = "") -> list[str]:
    """The run.py command line of one configuration."""
    return [sys.executable, "-m", "experiments.run", f"--env={env}", f"--dataset={dataset}",
            f"--rank={rank}", f"--preset={preset}",
            f"--out_dir={os.path.join(out_dir, f'rank{rank}')}", *shlex.split(extra)]


PAPER_DATASETS = ("pure", "random", "pure_eps20", "pure_eps40")


def results_path(out_dir: str, env: str, dataset: str, rank: int) -> str:
    """Where run.py writes one configuration's results.json (a data file's
    runs are named by the file's stem)."""
    name = dataset if dataset in PAPER_DATASETS else os.path.splitext(
        os.path.basename(dataset))[0]
    return os.path.join(out_dir, f"rank{rank}", env, name, "results.json")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    env, preset, out_dir = FLAGS.env, FLAGS.preset, FLAGS.out_dir
    try:
        ranks = [int(r) for r in FLAGS.ranks]
    except ValueError as err:
        raise app.UsageError(f"--ranks must be integers, got {FLAGS.ranks}") from err
    if not FLAGS.datasets or not ranks:
        raise app.UsageError("--datasets and --ranks must each name at least one value")

    configs = [(d, r) for d in FLAGS.datasets for r in ranks]
    for i, (dataset, rank) in enumerate(configs, 1):
        command = run_command(env, dataset, rank, preset, out_dir, FLAGS.extra)
        print(f"[{i}/{len(configs)}] {shlex.join(command)}", flush=True)
        code = subprocess.call(command)
        if code != 0:
            sys.exit(f"sweep stopped: {env}/{dataset} at rank {rank} failed (exit status "
                     f"{code}); command: {shlex.join(command)}")

    rows = []
    for dataset, rank in configs:
        path = results_path(out_dir, env, dataset, rank)
        try:
            with open(path, encoding="utf-8") as handle:
                rows.append((f"{dataset}, rank {rank}", json.load(handle)))
        except FileNotFoundError:
            sys.exit(f"sweep: run.py finished but wrote no {path}")
    text = (f"# PerSim sweep: {env}, preset {preset}\n\n"
            f"Means over the test agents. Extra flags: `{FLAGS.extra or 'none'}`.\n\n"
            + sweep_table(rows))
    table_path = os.path.join(out_dir, f"{env}_sweep.md")
    with atomic_write(table_path, "wb") as handle:
        handle.write(text.encode("utf-8"))
    print(text)
    print(f"wrote {table_path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
