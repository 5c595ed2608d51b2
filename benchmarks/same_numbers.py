"""Does a change leave every number of the pipeline as it was? Tiny runs of
`experiments.run` with every method, on a git revision and on the working
tree, compared field by field (timings aside).

    python -m benchmarks.same_numbers --before=64e1290      # ~30 min on 2 cores

The runs: CartPole / pure and MountainCar / random with every method, one
trial; HalfCheetah / random with every method (CEM); MountainCar / random with
PerSim over two trials and two episodes. Each at a tiny size (8 agents, 2
epochs, a few candidates and steps) on one CPU device, so that a run depends
on nothing but the code. Prints one JSON line per run (the differing fields)
and exits 1 when any number differs.

Known differences that are not numbers are declared in `RENAMED_CONFIG`
(settings that moved within results.json["config"]) and `returns_axes`
(every method's reward returns are (trials, K, E); True env + MPC's were (K, E)).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

from experiments import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BEFORE = flags.DEFINE_string("before", "HEAD", "The git revision to compare with.")
_OUT = flags.DEFINE_string("out_dir", None, "Where the runs go (default: a temporary folder); "
                           "a run already there is reused.")

TINY = ["--trials=1", "--num_agents=8", "--ensemble_size=2", "--epochs=2", "--state_hidden=32",
        "--episodes=1", "--max_steps=12", "--prediction_episodes=2", "--candidates=16",
        "--horizon=5", "--bcq_iterations=40", "--cadm_iterations=1",
        "--cadm_pairs_per_epoch=200", "--cadm_particles=5", "--policy_episodes=1",
        "--skip=plots"]
RUNS = {
    "cartpole_pure": ["--env=cartpole", "--dataset=pure", "--methods=all", *TINY],
    "mountaincar_random": ["--env=mountaincar", "--dataset=random", "--methods=all", *TINY],
    "halfcheetah_random": ["--env=halfcheetah", "--dataset=random", "--methods=all",
                           "--cem_rounds=1", "--cem_elites=4", *TINY],
    "mountaincar_trials": ["--env=mountaincar", "--dataset=random", "--methods=persim",
                           *[f for f in TINY if not f.startswith(("--trials", "--episodes"))],
                           "--trials=2", "--episodes=2"],
}
# Settings moved from RunConfig's fields to the methods' own (issue 28).
RENAMED_CONFIG = {"bcq_iterations", "cadm_iterations", "cadm_pairs_per_epoch", "cadm_particles",
                  "method_settings"}


def run(tree: str, name: str, out_dir: str) -> dict:
    """results.json of run `name` made with the code in `tree`."""
    directory = os.path.join(out_dir, name)
    results = os.path.join(directory, "runs", *RUNS[name][0].split("=")[1:],
                           RUNS[name][1].split("=")[1], "results.json")
    if not os.path.exists(results):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
        subprocess.run([sys.executable, "-m", "experiments.run", *RUNS[name],
                        f"--out_dir={directory}/runs", f"--data_dir={directory}/data"],
                       cwd=tree, env=env, check=True, capture_output=True)
    with open(results) as handle:
        return json.load(handle)


def returns_axes(results: dict) -> dict:
    """Every reward record's returns as (trials, K, E)."""
    rows = [row.get("reward") for row in (results.get("methods") or {}).values() if row]
    rows.append((results.get("reward") or {}).get("true_env_mpc"))
    for reward in rows:
        if reward and "returns" in reward and _depth(reward["returns"]) == 2:
            reward["returns"] = [reward["returns"]]
    return results


def _depth(value) -> int:
    return 1 + _depth(value[0]) if isinstance(value, list) and value else 0


def differences(before: dict, after: dict) -> list[str]:
    """`reproduce.differences` (timings aside), less the settings that moved
    within results.json["config"] (`RENAMED_CONFIG`)."""
    return [line for line in reproduce.differences(before, after)
            if not any(line.startswith(f"/config/{key}:") for key in RENAMED_CONFIG)]


def main(argv):
    del argv
    out_dir = _OUT.value or tempfile.mkdtemp(prefix="same_numbers_")
    before_tree = os.path.join(out_dir, "tree_before")
    if not os.path.exists(before_tree):
        subprocess.run(["git", "worktree", "add", "--detach", before_tree, _BEFORE.value],
                       cwd=ROOT, check=True, capture_output=True)
    differing = 0
    for name in RUNS:
        before = returns_axes(run(before_tree, name, os.path.join(out_dir, "before")))
        after = returns_axes(run(ROOT, name, os.path.join(out_dir, "after")))
        found = differences(before, after)
        differing += len(found)
        print(json.dumps({"run": name, "before": _BEFORE.value, "methods": list(after["methods"]),
                          "differences": found}), flush=True)
    return 1 if differing else 0


if __name__ == "__main__":
    app.run(main)
