"""The reproduction record: every env × dataset × method beside the paper's tables.

    python -m experiments.reproduce --preset=quick [--envs=cartpole,mountaincar]
        [--datasets=pure,random] [--methods=all] [--report_only] [--carry_over=true_env_mpc]
    python -m experiments.reproduce --preset=quick --envs=cartpole --datasets=random --verify
        [--verify_methods=persim]

Each cell (env × dataset) runs as `python -m experiments.run --env=E
--dataset=D --preset=P --methods=M --out_dir=<out_dir>/<preset>` in a process
of its own, one after the other. A cell whose record already holds every
requested method under this preset's current settings is skipped (one made
with settings the preset has since changed is re-run); an interrupted one resumes
through the run's stage cache (a finished method is not retrained). After each
cell its `results.json` and `report.md` are copied to the record,
`<record_dir>/<preset>/<env>/<dataset>/`, and the record's summary
`<record_dir>/<preset>/REPORT.md` is rewritten from every cell recorded so far:

  * the preset's settings beside the paper's protocol, each departure in bold
    (the quick cells called indicative);
  * the headline: PerSim's and True env + MPC's mean prediction RMSE and reward
    per cell, ours beside the paper's, with each cell's trials and episodes and
    its stage seconds beside its last run's;
  * the paper's comparative claims checked on our numbers and on the paper's,
    cell by cell, each a verdict (holds / fails / inconclusive) from the 95 %
    interval of the difference, with the counts;
  * where a cell departs from the paper (ours outside the 95 % interval of the
    difference), and the note recorded about it;
  * each cell's prediction and reward tables (the per-cell report's) and its
    claims' differences and intervals.

`--report_only` rewrites REPORT.md from the committed records alone.

`--verify` re-runs recorded cells from nothing (a fresh dataset cache and run
folder under `--verify_dir`, a temporary folder by default) and compares every
number of the new `results.json` with the recorded one, timings aside; the
outcome is kept beside the cell as `rerun.json` and shown in REPORT.md.
`--verify_methods=persim` re-runs PerSim alone (the dataset, the simulator,
its prediction and rewards) and compares every number but those of the
methods left out, which the outcome names (a HalfCheetah cell's True env +
MPC costs hours on a CPU and does not depend on the dataset).

`--carry_over=true_env_mpc` takes the reward of a method that neither trains
nor reads the dataset from a recorded cell of the same env and preset made
with the run's test agents, planner, episodes, max steps and seed, instead of
planning it again; the cell's results.json names what was carried and from
where ("carried_over"), and its timings leave it out.

The claims and what is measured about them live apart: `experiments.claims`
checks the claims and finds the departures; the measured notes are data beside
the record, `experiments/results/notes.json`. The investigations that measured
them are `python -m experiments.diagnostics.<name>`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

from experiments import config as config_lib
from experiments import claims, paper, report
from experiments.claims import ALL_ENVS, ALL_METHODS, cell_name, mean_of
from experiments.datagen.datasets import DATASETS
from persim_jax.data import atomic_write, jsonable, write_json

FLAGS = flags.FLAGS
RECORD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def define_flags() -> None:
    flags.DEFINE_enum("preset", "quick", ["quick", "paper"], "The runs' preset.")
    flags.DEFINE_list("envs", list(ALL_ENVS), "Environments.")
    flags.DEFINE_list("datasets", list(DATASETS), "Datasets.")
    flags.DEFINE_list("methods", ["all"], "Methods (experiments.run's --methods).")
    flags.DEFINE_string("out_dir", "runs", "The runs' working folders: <out_dir>/<preset>/.")
    flags.DEFINE_string("data_dir", "data", "Dataset cache.")
    flags.DEFINE_string("record_dir", RECORD_DIR, "The record: <record_dir>/<preset>/.")
    flags.DEFINE_bool("report_only", False, "Rewrite REPORT.md from the record; run nothing.")
    flags.DEFINE_bool("verify", False, "Re-run the recorded cells from nothing and compare "
                      "their numbers with the record (writes rerun.json beside each).")
    flags.DEFINE_string("verify_dir", None, "Scratch folder of --verify (kept, so an "
                        "interrupted check resumes); default: a temporary one, removed after.")
    flags.DEFINE_list("carry_over", None, "Methods that neither train nor read the dataset "
                      "(true_env_mpc) whose reward a recorded cell of the same env and preset "
                      "holds under the key this run computes: seeded into the run's stage "
                      "cache instead of re-run (they must come from the same code).")
    flags.DEFINE_list("verify_methods", None, "--verify re-runs only these of the recorded "
                      "methods (PerSim always) and compares everything but the others' "
                      "numbers; default: every recorded method.")


# ---------------------------------------------------------------------------
# Cells


def cell_dir(record_dir: str, preset: str, env: str, dataset: str) -> str:
    return os.path.join(record_dir, preset, env, dataset)


def recorded(record_dir: str, preset: str, env: str, dataset: str) -> dict | None:
    path = os.path.join(cell_dir(record_dir, preset, env, dataset), "results.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# results.json "config" entries the run fills in itself: the methods run, the
# planner's full description (from `planner` and the env), the rank chosen.
DERIVED_SETTINGS = frozenset({"methods", "planner", "rank_used"})


def settings_changed(results: dict, preset: str, overrides: dict | None = None) -> list[str]:
    """The run settings a recorded cell was made with that `preset` (with
    `overrides`, `RunConfig` fields) no longer has (`name: recorded -> now`),
    e.g. after a preset's training choice changed."""
    try:
        current = dataclasses.asdict(config_lib.resolve(results["env"], results["dataset"], preset,
                                                        overrides))
    except (KeyError, config_lib.UserError):
        return []
    recorded_config = results.get("config") or {}
    as_json = jsonable(current)                        # tuples as lists, as results.json
    return [f"{name}: {recorded_config[name]!r} -> {value!r}" for name, value in as_json.items()
            if name in recorded_config and name not in DERIVED_SETTINGS
            and recorded_config[name] != value]


def is_done(results: dict | None, preset: str, methods: list[str],
            overrides: dict | None = None) -> bool:
    """The recorded cell holds every requested method under `preset`, made
    with the preset's current settings (with `overrides`)."""
    if (not results or results.get("preset") != preset
            or settings_changed(results, preset, overrides)):
        return False
    have = set((results.get("methods") or {}))
    wanted = set(ALL_METHODS if "all" in methods else methods) | {"persim"}
    if not (results.get("config") or {}).get("true_env_mpc", True):
        wanted.discard("true_env_mpc")          # the preset leaves it out (HalfCheetah quick)
    return wanted <= have


def override_flags(overrides: dict | None) -> list[str]:
    """`experiments.run`'s flags setting `overrides` (`RunConfig` fields)."""
    flags_ = []
    for name, value in (overrides or {}).items():
        if isinstance(value, bool):
            flags_.append(f"--{name}" if value else f"--no{name}")
        elif isinstance(value, (list, tuple)):
            flags_.append(f"--{name}={','.join(str(v) for v in value)}")
        elif value is not None:
            flags_.append(f"--{name}={value}")
    return flags_


def carry_over(env_name: str, dataset: str, preset: str, names: list[str], run_dir: str,
               record_dir: str, overrides: dict | None = None,
               seed: int = 0) -> dict[str, str]:
    """Seeds the stage cache of the run in `run_dir` with the recorded reward
    of each method of `names` that neither trains nor reads the dataset
    (True env + MPC: its returns depend on the test agents, the planner, the
    episodes and the seed), taken from a recorded cell of the same env and
    preset whose test agents, planner, episodes, max steps and seed are the
    run's (under `overrides` of the preset's settings), so the run reuses it
    instead of planning again (hours for HalfCheetah on a CPU). The caller
    vouches that the code computing it has not changed since. Returns
    {method: the cell it came from}."""
    import numpy as np                  # the run's modules, only when carrying over

    import envs
    from experiments import pipeline, stages
    from experiments.cache import RunDirectory
    from persim_jax import methods
    config = config_lib.resolve(env_name, dataset, preset, overrides)
    env = envs.make(env_name)
    chosen = pipeline.methods_for(env, dataclasses.replace(config, methods=tuple(names)))
    planner = stages.planner_for(env, config)
    agent_ids = np.arange(len(env.test_agents))
    wanted = {"planner": stages.planner_key(planner), "episodes": config.episodes,
              "max_steps": config.max_steps, "seed": seed,
              "test_agents": np.asarray(env.test_agents, np.float32).tolist()}
    run = RunDirectory(run_dir, force=False)
    carried = {}
    for method in chosen:
        if isinstance(method, methods.Trains) or not isinstance(method, methods.ModelBased):
            continue
        for source in [dataset, *(d for d in DATASETS if d != dataset)]:
            results = recorded(record_dir, preset, env_name, source)
            row = ((results or {}).get("methods") or {}).get(method.name) or {}
            if not row.get("reward") or results.get("preset") != preset:
                continue
            settings = results.get("config") or {}
            had = {"planner": {k: v for k, v in (settings.get("planner") or {}).items()
                               if k != "shard_candidates"},
                   "episodes": settings.get("episodes"), "max_steps": settings.get("max_steps"),
                   "seed": results.get("seed"),
                   "test_agents": np.asarray(results.get("test_agents"), np.float32).tolist()}
            if had != wanted:
                continue
            own, _ = stages.method_planner(method, planner, env)
            key = stages.reward_key(method, env, own, config, agent_ids, seed, None)
            run.store(f"reward_{method.name}", key, row["reward"], 0.0)
            carried[method.name] = f"{preset}/{env_name}/{source}"
            break
    return carried


def run_cell(env: str, dataset: str, preset: str, methods: list[str], out_dir: str,
             data_dir: str, record_dir: str, overrides: dict | None = None,
             carried: list[str] | None = None) -> int:
    """Runs one cell (a subprocess; `overrides` of the preset's settings as
    its flags) and copies its outputs to the record; `carried` methods are
    taken from the record where it holds them (`carry_over`), which the
    cell's results.json names under "carried_over"."""
    work = os.path.join(out_dir, preset)
    sources = {}
    if carried:
        sources = carry_over(env, dataset, preset, carried, os.path.join(work, env, dataset),
                             record_dir, overrides)
        print(f"[reproduce] {env} / {dataset}: carried over "
              f"{', '.join(f'{m} from {c}' for m, c in sources.items()) or 'nothing'}",
              flush=True)
    command = [sys.executable, "-m", "experiments.run", f"--env={env}", f"--dataset={dataset}",
               f"--preset={preset}", f"--methods={','.join(methods)}", f"--out_dir={work}",
               f"--data_dir={data_dir}", *override_flags(overrides)]
    print(f"[reproduce] {env} / {dataset}: {' '.join(command[2:])}", flush=True)
    code = subprocess.call(command)
    if code:
        print(f"[reproduce] {env} / {dataset} failed (exit code {code}); its stages stay cached "
              f"in {work}", flush=True)
        return code
    target = cell_dir(record_dir, preset, env, dataset)
    os.makedirs(target, exist_ok=True)
    for name in ("results.json", "report.md"):
        with open(os.path.join(work, env, dataset, name), "rb") as source:
            payload = source.read()
        if name == "results.json" and sources:
            results = json.loads(payload)
            results["carried_over"] = {m: c for m, c in sources.items()
                                       if m in (results.get("methods") or {})}
            write_json(os.path.join(target, name), results)
            continue
        with atomic_write(os.path.join(target, name)) as handle:
            handle.write(payload)
    stale = os.path.join(target, RERUN_FILE)      # a re-run's outcome of the record replaced
    if os.path.exists(stale):
        os.remove(stale)
    return 0


# ---------------------------------------------------------------------------
# Re-runs

# Fields that measure the machine, not the method: wall-clock seconds.
# Compared apart: the library versions and the host CPU are not numbers of
# the run (a record predating them has none), but a difference in them is
# reported beside: either changes HalfCheetah's datasets (benchmarks/RESULTS.md,
# "Dataset reproducibility").
UNCOMPARED = frozenset({"timing_s", "train_seconds", "seconds", "libraries", "cpu",
                        "carried_over"})
RERUN_FILE = "rerun.json"


def differences(recorded_results, rerun, path: str = "") -> list[str]:
    """Where two results.json trees differ (`path: recorded != rerun`), timings
    aside; numbers must be equal, not close: the same seed on the same kind of
    machine gives the same floats."""
    if isinstance(recorded_results, dict) and isinstance(rerun, dict):
        found = []
        for key in sorted(set(recorded_results) | set(rerun), key=str):
            if key in UNCOMPARED:
                continue
            where = f"{path}/{key}"
            if key not in recorded_results or key not in rerun:
                found.append(f"{where}: only in the {'re-run' if key in rerun else 'record'}")
            else:
                found += differences(recorded_results[key], rerun[key], where)
        return found
    if isinstance(recorded_results, list) and isinstance(rerun, list):
        if len(recorded_results) != len(rerun):
            return [f"{path}: {len(recorded_results)} entries != {len(rerun)}"]
        return [line for i, (a, b) in enumerate(zip(recorded_results, rerun))
                for line in differences(a, b, f"{path}[{i}]")]
    return [] if recorded_results == rerun else [f"{path or '/'}: {recorded_results!r} != {rerun!r}"]


def without_methods(results, names: frozenset[str], path: tuple[str, ...] = ()):
    """A copy of a results.json tree without the entries of the methods `names`
    (keyed by a method's name anywhere but in `config`, whose settings are
    compared whole, and out of `config.methods`, the list of methods run)."""
    if isinstance(results, dict):
        return {key: without_methods(value, names, (*path, key)) for key, value in results.items()
                if path[:1] == ("config",) or key not in names}
    if isinstance(results, list):
        if path == ("config", "methods"):
            return [name for name in results if name not in names]
        return [without_methods(value, names, path) for value in results]
    return results


def verify_cell(env: str, dataset: str, preset: str, scratch: str, record_dir: str,
                methods: list[str] | None = None) -> bool:
    """Re-runs a recorded cell under `scratch` (its own dataset cache, run and
    record folders) with the recorded methods (or `methods` of them, PerSim
    always) and seed, compares every number but those of the methods not
    re-run, and writes `rerun.json` beside the recorded cell. True when every
    compared number is equal."""
    recorded_results = recorded(record_dir, preset, env, dataset)
    if recorded_results is None:
        print(f"[reproduce] {env} / {dataset}: not recorded, nothing to verify", flush=True)
        return True
    have = sorted(recorded_results.get("methods") or {"persim": None})
    missing = sorted(set(methods or ()) - set(have))
    if missing:
        raise app.UsageError(f"--verify_methods: {', '.join(missing)} not recorded in "
                             f"{env} / {dataset} (recorded: {', '.join(have)})")
    rerun_methods = sorted(set(methods) | {"persim"}) if methods else have
    skipped = frozenset(have) - set(rerun_methods)
    code = run_cell(env, dataset, preset, rerun_methods, os.path.join(scratch, "runs"),
                    os.path.join(scratch, "data"), os.path.join(scratch, "record"))
    if code:
        return False
    rerun = recorded(os.path.join(scratch, "record"), preset, env, dataset)
    return compare_rerun(record_dir, preset, recorded_results, rerun, skipped)


def compare_rerun(record_dir: str, preset: str, recorded_results: dict, rerun: dict,
                  skipped: frozenset[str] = frozenset()) -> bool:
    """Compares a re-run's results.json with the recorded one, both without
    the methods `skipped` (not re-run), writes the outcome as `rerun.json`
    beside the recorded cell and prints it. True when every compared number
    is equal."""
    env, dataset = recorded_results["env"], recorded_results["dataset"]
    found = differences(without_methods(recorded_results, skipped),
                        without_methods(rerun, skipped))
    outcome = {"date": datetime.date.today().isoformat(), "identical": not found,
               "methods_rerun": sorted(set(rerun.get("methods") or {}) - skipped),
               "methods_not_rerun": sorted(skipped),
               "differences": found[:50], "differing_fields": len(found),
               "seconds_recorded": (recorded_results.get("timing_s") or {}).get("total"),
               "seconds_rerun": (rerun.get("timing_s") or {}).get("total"),
               "backend": rerun.get("backend"), "devices": rerun.get("devices"),
               "libraries_recorded": recorded_results.get("libraries"),
               "libraries_rerun": rerun.get("libraries"),
               "cpu_recorded": recorded_results.get("cpu"), "cpu_rerun": rerun.get("cpu")}
    with atomic_write(os.path.join(cell_dir(record_dir, preset, env, dataset), RERUN_FILE)) as handle:
        handle.write((json.dumps(outcome, indent=1) + "\n").encode("utf-8"))
    verdict = "every number identical" if not found else f"{len(found)} fields differ"
    if skipped:
        verdict += f" (not re-run: {', '.join(sorted(skipped))})"
    print(f"[reproduce] {env} / {dataset}: re-run from nothing, {verdict}", flush=True)
    for line in found[:10]:
        print(f"  {line}", flush=True)
    return not found


# ---------------------------------------------------------------------------
# REPORT.md


def _rerun_mark(record_dir: str, preset: str, results: dict) -> str:
    path = os.path.join(cell_dir(record_dir, preset, results["env"], results["dataset"]),
                        RERUN_FILE)
    if not os.path.exists(path):
        return report.DASH
    with open(path, encoding="utf-8") as handle:
        outcome = json.load(handle)
    scope = (f"; not re-run: {', '.join(outcome['methods_not_rerun'])}"
             if outcome.get("methods_not_rerun") else "")
    if outcome.get("identical"):
        return f"identical ({outcome.get('date')}{scope})"
    return f"**differs**: {outcome.get('differing_fields')} fields ({outcome.get('date')}{scope})"


# Timings that are part of another: dataset generation is inside "dataset".
NESTED_TIMINGS = frozenset({"total", "dataset_generation"})


def stage_seconds(results: dict) -> float | None:
    """The seconds of a cell's stages, each as long as the run that did it
    took (`timing_s` without "total" and the nested "dataset_generation")."""
    timing = results.get("timing_s") or {}
    values = [v for k, v in timing.items() if k not in NESTED_TIMINGS and report.is_number(v)]
    return sum(values) if values else None


def cell_sizes(results: dict) -> tuple[str, str]:
    """("5", "20 / 100 / 200"): a cell's trials, and its episodes per test
    agent and trial: MPC / policy (BCQ) / prediction; – where none ran."""
    reward = results.get("reward") or {}
    prediction = results.get("prediction") or {}
    policy = (results.get("config") or {}).get("policy_episodes")
    model_free = any(report.method_row(results, m, "reward") for m in ("bcq_p", "bcq_a"))
    sizes = [reward.get("episodes"), policy if model_free else None, prediction.get("episodes")]
    return (str(reward.get("trials") or prediction.get("trials") or report.DASH),
            " / ".join(report.DASH if x is None else str(x) for x in sizes))


def _against_paper(results: dict) -> str:
    """"+85.9 [−69.0, 240.8]": PerSim's mean reward minus the paper's and the
    95 % normal interval (`claims.reward_against_paper`)."""
    found = claims.reward_against_paper(results)
    if found is None:
        return report.DASH
    if found.low is None:
        return f"{found.difference:+.1f} (no interval)"
    return f"{found.difference:+.1f} [{found.low:.1f}, {found.high:.1f}]"


def _headline_row(record_dir: str, preset: str, results: dict) -> list[str]:
    rows_paper = paper.paper_rows(results["env"], results["dataset"])
    ours_true = report.method_row(results, "true_env_mpc", "reward")
    timing = results.get("timing_s") or {}
    return [
        f"[{cell_name(results)}]({results['env']}/{results['dataset']}/report.md)",
        report.fixed_digits(mean_of(results, "persim", "prediction", "rmse"), 3),
        report.fixed_digits(report.mean_or_none((rows_paper["prediction"].get("persim") or {}).get("rmse")), 3),
        report.fixed_digits(mean_of(results, "persim", "reward", "mean"), 1),
        report.fixed_digits(report.mean_or_none((rows_paper["reward"].get("persim") or {}).get("mean")), 1),
        _against_paper(results),
        report.fixed_digits(report.mean_or_none((ours_true or {}).get("mean")), 1),
        report.fixed_digits(report.mean_or_none((rows_paper["true_env_mpc"] or {}).get("mean")), 1),
        str(len(results.get("methods") or {})), *cell_sizes(results),
        report.fixed_digits(stage_seconds(results), 0), report.fixed_digits(timing.get("total"), 0),
        _rerun_mark(record_dir, preset, results)]


def _headline_section(record_dir: str, preset: str, cells: list[dict]) -> list[str]:
    header = ["cell", "PerSim RMSE ours", "paper", "PerSim reward ours", "paper",
              "ours − paper [95 %]", "True env + MPC ours", "paper", "methods", "trials",
              "episodes per agent: MPC / BCQ / prediction", "stage seconds", "last run seconds",
              "re-run from nothing"]
    rows = [_headline_row(record_dir, preset, results) for results in cells]
    return ["## Headline: means over the 5 test agents", "",
            "No ± here: each cell's section gives the spreads, each saying what it is over. The "
            "paper's numbers are means over its 5 trials of 20 MPC (100 BCQ) episodes per test "
            "agent and 200 prediction episodes. \"ours − paper [95 %]\": PerSim's mean reward "
            "minus the paper's, with the normal interval from each agent's standard error (ours "
            "over trials, or over one trial's episodes, episode noise only; the paper's std over "
            "its 5 trials / √5).", "",
            "Seconds: a cell's stages may have run in several invocations (an interrupted run "
            "resumed, a method added later, a cell re-recorded with its stages cached). Each "
            "stage keeps the seconds of the invocation that did it, so \"stage seconds\" is the "
            "compute that made the record (dataset generation counted once, inside the dataset "
            "stage), while \"last run seconds\" (`timing_s.total`) is the wall time of the last "
            "invocation alone, which reused every stage it found done: the two differ wherever "
            "stages were reused, and the record does not say which were. A method carried over "
            "from another cell (`--carry_over`, named in the cell's `carried_over`) counts "
            "0 s here: its seconds are in the cell it came from. The last column: "
            "`--verify` re-ran the cell from nothing (a new dataset, new training) and compared "
            "every number with the record, timings aside.", "",
            report.markdown_table(header, rows), ""]


def _cell_sections(cells: list[dict]) -> list[str]:
    lines = []
    for results in cells:
        rows_paper = paper.paper_rows(results["env"], results["dataset"])
        lines += [f"## {cell_name(results)}", ""]
        for section in (report.prediction_section(results, rows_paper),
                        report.reward_section(results, rows_paper)):
            lines.append(section.replace("## ", "### ", 1))
        lines += claims.cell_claims_table(results)
    return lines


# The settings the presets set, as (label, PRESETS key, the paper's value in words
# where its protocol entry alone would mislead).
SETTING_ROWS = (
    ("trials (independently trained models)", "trials", None),
    ("agents in the dataset", "num_agents", None),
    ("ensemble members", "ensemble_size", None),
    ("epochs", "epochs", None),
    ("minibatch", "batch_size", None),
    ("Adam step size", "learning_rate", None),
    ("step size halved every (epochs)", "lr_halving_epochs",
     "150 (the authors' code; the paper's text does not say)"),
    ("inputs", "standardize", "not stated (the authors' final code: raw for CartPole and "
     "MountainCar, standardised for HalfCheetah)"),
    ("MPC episodes per test agent and trial", "episodes", None),
    ("prediction episodes per test agent", "prediction_episodes", None),
    ("True env + MPC", "true_env_mpc", None),
    ("planner", None, "random shooting 1000 × 30 (CartPole), 1000 × 50 (MountainCar); CEM "
     "200 × 30, 50 elites, 1 + 5 rounds (HalfCheetah)"),
    ("BCQ iterations", "bcq_iterations", None),
    ("BCQ episodes per test agent and trial", "policy_episodes", None),
    ("CaDM iterations", "cadm_iterations", None),
    ("CaDM (context, transition) pairs per epoch", "cadm_pairs_per_epoch", None),
    ("PE-TS CaDM particles", "cadm_particles", None),
)
PLANNER_KEYS = ("candidates", "horizon", "cem_rounds", "cem_elites")


def _setting_text(key: str, value) -> str:
    if key == "standardize":
        return "standardised" if value else "raw"
    if key == "cadm_pairs_per_epoch" and value is None:
        return "every pair"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and value >= 1_000:
        return f"{value:,}"
    return str(value)


def _planner_text(settings: dict) -> tuple[str, bool]:
    if all(settings.get(k) is None for k in PLANNER_KEYS):
        return "the paper's", False
    return (f"CEM {settings.get('candidates')} × {settings.get('horizon')}, "
            f"{settings.get('cem_elites')} elites, 1 + {settings.get('cem_rounds')} rounds", True)


def settings_section(preset: str) -> list[str]:
    """REPORT.md's opening: the preset's settings per env beside the paper's
    protocol (`paper.PAPER_PROTOCOL`), each departure in bold."""
    envs = list(ALL_ENVS)
    header = ["setting", "the paper", *[paper.display_name(env) for env in envs]]
    rows, departures = [], []
    for label, key, in_words in SETTING_ROWS:
        theirs = in_words or _setting_text(key, paper.PAPER_PROTOCOL[key])
        cells = []
        for env in envs:
            settings = paper.PRESETS[preset][env]
            if key is None:
                text, departs = _planner_text(settings)
            else:
                text = _setting_text(key, settings[key])
                departs = key in paper.PAPER_PROTOCOL and settings[key] != paper.PAPER_PROTOCOL[key]
            if departs:
                departures.append(f"{paper.display_name(env)} {label} {text}")
            cells.append(f"**{text}**" if departs else text)
        rows.append([label, theirs, *cells])
    lines = [f"## Settings: preset `{preset}` beside the paper's protocol", "",
             "The paper's column is its text (section 6, appendix D-E; the baselines appendix "
             "D.2); ours are `experiments/paper.py: PRESETS`. A departure from the paper is in "
             "bold. Model sizes (rank, hidden layers) are the paper's in both presets.", "",
             report.markdown_table(header, rows), ""]
    if preset == "quick":
        lines += ["**The quick cells are indicative, not a reproduction**: one trial (one "
                  "trained model, so no training noise in any interval), a few MPC episodes per "
                  "agent (each cell's are in the headline table; a cell of one episode per agent "
                  "has no reward interval at all), fewer epochs, "
                  "a smaller planner for HalfCheetah and smaller baselines: every bold entry "
                  f"above, {len(departures)} departures in all.", ""]
    else:
        lines += ["Departures of this preset from the paper's text: "
                  + ("; ".join(departures) if departures else "none") + " (the minibatches "
                  "measured better at the quick size, `experiments/paper.py: TRAINING`, "
                  "`benchmarks/RESULTS.md`).", ""]
    return lines


def render(record_dir: str, preset: str, notes: claims.Notes | None = None) -> str:
    """REPORT.md of `<record_dir>/<preset>/`: the headline, the paper's claims,
    the departures from the paper (with `notes`, default the record's
    `notes.json`) and each recorded cell's tables."""
    notes = notes or claims.load_notes()
    cells = [r for env in ALL_ENVS for dataset in DATASETS
             if (r := recorded(record_dir, preset, env, dataset)) is not None]
    lines = [f"# Reproduction record: preset `{preset}`", "",
             f"{len(cells)} of {len(ALL_ENVS) * len(DATASETS)} env × dataset cells recorded "
             f"(`python -m experiments.reproduce --preset={preset}`); rewritten "
             f"{datetime.date.today().isoformat()}. Each cell's folder holds its `results.json` "
             "and `report.md` (every method, ours beside the paper's).", ""]
    if not cells:
        return "\n".join(lines + ["Nothing recorded yet.", ""])
    lines += settings_section(preset)
    lines += _headline_section(record_dir, preset, cells)
    lines += claims.claims_section(cells, notes)
    lines += claims.departures_section(cells, notes)
    lines += _cell_sections(cells)
    return "\n".join(lines).rstrip() + "\n"


def write_report(record_dir: str, preset: str) -> str:
    path = os.path.join(record_dir, preset, "REPORT.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(render(record_dir, preset).encode("utf-8"))
    return path


# ---------------------------------------------------------------------------
# The command


def verify_cells(envs: list[str], datasets: list[str], preset: str, record_dir: str,
                 verify_dir: str | None, methods: list[str] | None = None) -> list[str]:
    """`--verify`: re-runs each recorded cell under `verify_dir` (a temporary
    folder, removed after, when None), with `methods` of its recorded ones
    (None: all); returns the cells that differ or failed."""
    scratch = verify_dir or tempfile.mkdtemp(prefix="persim_verify_")
    try:
        return [f"{env}/{dataset}" for env in envs for dataset in datasets
                if not verify_cell(env, dataset, preset, os.path.join(scratch, f"{env}_{dataset}"),
                                   record_dir, methods)]
    finally:
        if verify_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def run_cells(envs: list[str], datasets: list[str], preset: str, methods: list[str],
              out_dir: str, data_dir: str, record_dir: str,
              overrides: dict | None = None, carried: list[str] | None = None) -> list[str]:
    """Runs each cell not yet recorded under `preset`'s current settings (with
    `overrides`, as `experiments.paper_scale --dry_run` shrinks them),
    rewriting REPORT.md after each; returns the cells that failed."""
    failed = []
    for env in envs:
        for dataset in datasets:
            results = recorded(record_dir, preset, env, dataset)
            if is_done(results, preset, methods, overrides):
                print(f"[reproduce] {env} / {dataset}: recorded, skipped", flush=True)
                continue
            if results and (changed := settings_changed(results, preset, overrides)):
                print(f"[reproduce] {env} / {dataset}: recorded under other settings "
                      f"({'; '.join(changed)}), re-running", flush=True)
            if run_cell(env, dataset, preset, methods, out_dir, data_dir, record_dir,
                        overrides=overrides, carried=carried):
                failed.append(f"{env}/{dataset}")
            write_report(record_dir, preset)
    return failed


def main(argv):
    del argv
    unknown = (sorted(set(FLAGS.envs) - set(ALL_ENVS)) + sorted(set(FLAGS.datasets) - set(DATASETS))
               + sorted(set(FLAGS.verify_methods or ()) - set(ALL_METHODS))
               + sorted(set(FLAGS.carry_over or ()) - set(ALL_METHODS)))
    if unknown:
        raise app.UsageError(f"unknown env(s) / dataset(s) / method(s): {', '.join(unknown)}")
    failed = []
    if FLAGS.verify:
        failed = verify_cells(FLAGS.envs, FLAGS.datasets, FLAGS.preset, FLAGS.record_dir,
                              FLAGS.verify_dir, FLAGS.verify_methods)
    elif not FLAGS.report_only:
        failed = run_cells(FLAGS.envs, FLAGS.datasets, FLAGS.preset, FLAGS.methods,
                           FLAGS.out_dir, FLAGS.data_dir, FLAGS.record_dir,
                           carried=FLAGS.carry_over)
    print(f"[reproduce] {write_report(FLAGS.record_dir, FLAGS.preset)}", flush=True)
    if failed:
        print(f"[reproduce] {'differ or failed' if FLAGS.verify else 'failed'}: "
              f"{', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
