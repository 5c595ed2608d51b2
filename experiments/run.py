"""The whole PerSim pipeline for one env × dataset, our numbers beside the paper's.

    python -m experiments.run --env=cartpole --dataset=pure            # quick preset
    python -m experiments.run --env=halfcheetah --dataset=random --preset=paper   # a GPU
    python -m experiments.run --env=cartpole --dataset=my_logs.csv     # your own data
    python -m experiments.run --dataset=minari:persim/cartpole/pure-v0 # a local Minari dataset
    python -m experiments.run --env=mountaincar --dataset=random --rank=5 --epochs=50

Stages, each shown as it runs and skipped on a re-run when its inputs and
settings are unchanged (`--force` redoes them all):

  dataset     the paper's dataset, generated once by our own code and cached
              under `--data_dir` (or the user's `.npz` / `.csv` / `.parquet`);
  train       `--trials` ensembles of personalised simulators (orbax
              checkpoints, so an interrupted run resumes; the trained simulator
              is kept and reused while the settings match);
  prediction  the paper's open-loop prediction error on the 5 test agents
              (10 teacher-forced steps, then 50 open-loop; RMSE, median R²);
  reward      MPC episodes of the 5 test agents planned on their learned
              simulators (PerSim) and on their true physics (True env + MPC);
  plots       t-SNE of the agent factors coloured by each hidden covariate,
              predicted vs true trajectories of two test agents;
  report      `results.json` and `report.md` (ours beside Tables 8–14).

`--planner=icem` plans continuous actions with iCEM (Pinneri et al. 2020) at a
quarter of the paper CEM's model evaluations instead of its CEM.

Everything goes to `<out_dir>/<env>/<dataset>/`, written atomically. Presets:
`quick` (default) is sized for a 2-core CPU, `paper` uses the paper's settings
(300 epochs, 1000 / 200 candidates, 20 episodes × 5 trials) and is meant for a
GPU; any setting can be overridden by its flag. The presets live in the
registry `experiments/paper.py`; the run's settings are one `RunConfig`
(`experiments/config.py`). The compared methods (`persim_jax.methods`) go
through the same stages; each has its own keys.

Own data: `--dataset=PATH` reads the file (long format: `--agent_column`,
`--time_column`, `--state_prefix`, `--action_prefix`, `--covariate_prefix`,
`--discrete_actions`; any agent ids, mapped to 0..N-1 and kept), trains PerSim
and the population model on the first 80 % of each agent's trajectory, and
reports whether personalisation helps on the last 20 % (one-step and
`--open_loop_steps` open-loop error per agent and state dimension,
`experiments.personalisation`); given `--env` and covariates in the file
(units 0..4 inside the env's ranges), it also plans for those agents.
`--decide` (with `--reward=FILE.py:FUNCTION`, `--policies=...`) adds a
recommended plan per agent and each policy's value per agent on its
simulator, with the ensemble's spread (`experiments.decisions`).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # One JAX CPU device per core (JAX_NUM_CPU_DEVICES=1 keeps JAX's single
    # device), before gymnax, imported by envs, starts JAX's backends.
    from persim_jax import runtime
    runtime.use_cpu_cores()

from absl import app, flags

import envs
from experiments import cli
from experiments.config import UserError
from experiments.datagen import datasets
from experiments.pipeline import run_name, run_pipeline

FLAGS = flags.FLAGS

SKIPPABLE = ("prediction", "reward", "plots")


def define_flags() -> None:
    """The CLI's flags, defined only when it runs as a program (other
    experiments modules define `--env` too, and tests import several)."""
    flags.DEFINE_enum("env", None, list(envs.ENV_NAMES),
                      "Environment (its physics, known reward and test agents).")
    flags.DEFINE_string("dataset", "pure",
                        f"One of {', '.join(datasets.DATASETS)}, a path to your own .npz / "
                        f".csv / .parquet file, or minari:<id> (a local Minari dataset).")
    flags.DEFINE_enum("preset", "quick", ["quick", "paper"],
                      "quick: sized for a 2-core CPU; paper: the paper's settings (a GPU).")
    flags.DEFINE_integer("seed", 0, "Seed of the dataset, training (trial k uses seed + k) and "
                         "evaluation.")
    flags.DEFINE_string("out_dir", "runs", "Results go to <out_dir>/<env>/<dataset>/.")
    flags.DEFINE_string("data_dir", datasets.DEFAULT_DATA_DIR, "Dataset cache.")
    flags.DEFINE_list("skip", [], f"Stages to skip: {', '.join(SKIPPABLE)}.")
    flags.DEFINE_bool("force", False, "Redo every stage, even those already done.")
    cli.define_config_flags()
    cli.define_loader_flags()
    cli.define_decision_flags()


def run_from_flags() -> int:
    """The pipeline as the flags say; prints the report."""
    unknown = sorted(set(FLAGS.skip) - set(SKIPPABLE))
    if unknown:
        raise UserError(f"--skip: unknown stage(s) {unknown}; valid: {', '.join(SKIPPABLE)}")
    config = cli.settings_from_flags(FLAGS.env, FLAGS.dataset, FLAGS.preset)
    results = run_pipeline(FLAGS.env, FLAGS.dataset, config, preset=FLAGS.preset,
                           seed=FLAGS.seed, out_dir=FLAGS.out_dir, data_dir=FLAGS.data_dir,
                           force=FLAGS.force, skip=tuple(FLAGS.skip),
                           loader_options=cli.loader_options_from_flags(),
                           decide=cli.decision_request_from_flags())
    report_path = os.path.join(FLAGS.out_dir, results["env"] or "custom",
                               run_name(FLAGS.dataset), "report.md")
    with open(report_path) as handle:
        print(handle.read())
    return 0


def main(argv):
    cli.show_progress()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    return cli.exit_on_user_error(run_from_flags)


if __name__ == "__main__":
    define_flags()
    app.run(main)
