"""A user's own long-format data through the CLI, with flags only (issue 18):
string ids with gaps, covariate columns, made-up heterogeneous dynamics on
which personalisation must help; the personalisation report; every bad input
gives one clear line, exit code 2, no traceback and no output."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from experiments import own_data, run
from persim_jax import Simulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# String ids with gaps, not in sorted order in the file.
IDS = ("p-003", "p-017", "p-042", "p-005", "p-099", "p-120", "p-007", "p-064")
STEPS = 60
HEADER = ["patient", "step", "obs_level", "obs_bolus", "action_dose", "cov_sensitivity",
          "cov_weight"]


def make_patients(path, steps: int = STEPS, seed: int = 0) -> dict:
    """Writes a long-format CSV of len(IDS) agents and returns their logs.

    Agent n's level moves by 8 · sensitivity_n · dose per step (sensitivity
    from -1.5 to 1.5: the same dose raises one agent's level and lowers
    another's), so one model for everybody cannot predict it and a
    personalised one can. obs_bolus is mostly zero (a dose above 0.6 leaves a
    bolus that halves every step): the scale check must accept such a column.
    Rows are shuffled within each agent; the time column orders them.

    Returns:
      {id: (steps, 2) states}, the rows as logged.
    """
    rng = np.random.default_rng(seed)
    sensitivity = np.linspace(-1.5, 1.5, len(IDS))
    rng.shuffle(sensitivity)
    states = {}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for i, key in enumerate(IDS):
            level, bolus, rows, logged = 100.0 + 10 * rng.normal(), 0.0, [], []
            for t in range(steps):
                dose = float(rng.uniform(-1, 1))
                rows.append([key, t, repr(level), repr(bolus), repr(dose),
                             repr(float(sensitivity[i])), 60 + 5 * i])
                logged.append((level, bolus))
                level = level + 8.0 * float(sensitivity[i]) * dose - 0.1 * (level - 100.0)
                bolus = 0.5 * bolus + (10.0 * dose if dose > 0.6 else 0.0)
            states[key] = np.asarray(logged)
            for j in rng.permutation(steps):
                writer.writerow(rows[j])
    return states


COLUMN_FLAGS = ["--agent_column=patient", "--time_column=step", "--state_prefix=obs_",
                "--action_prefix=action_", "--covariate_prefix=cov_"]
TINY = ["--epochs=30", "--ensemble_size=2", "--state_hidden=16", "--action_hidden=16",
        "--rank=3", "--learning_rate=0.01", "--batch_size=32", "--open_loop_steps=5"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run on the patients' CSV, flags only, under umask 027."""
    folder = tmp_path_factory.mktemp("own")
    states = make_patients(folder / "patients.csv")
    out = folder / "out"
    result = subprocess.run(
        ["/bin/sh", "-c", 'umask 027 && exec "$0" "$@"', sys.executable, "-m",
         "experiments.run", f"--dataset={folder / 'patients.csv'}", *COLUMN_FLAGS, *TINY,
         f"--out_dir={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    return result, out / "custom" / "patients", states


def test_cli_reads_long_format_with_flags_and_reports_personalisation(cli_run):
    result, directory, states = cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    with open(directory / "results.json") as handle:
        results = json.load(handle)
    validation = results["validation"]
    assert results["data"]["agent_ids"] == sorted(IDS)
    assert results["data"]["covariate_names"] == ["cov_sensitivity", "cov_weight"]
    assert validation["state_names"] == ["obs_level", "obs_bolus"]
    assert set(validation["per_agent"]) == set(IDS)      # keyed by the user's ids

    # "No change" against a reference computed here from the logs: each
    # agent's held-out steps are its last 12 of 59 transitions.
    for key, logged in states.items():
        entry = validation["per_agent"][key]
        assert entry["held_out_transitions"] == 12 and entry["open_loop_windows"] == 8
        delta = np.diff(logged, axis=0)[-12:]
        np.testing.assert_allclose(entry["no_change"]["one_step"]["rmse"],
                                   np.sqrt(np.mean(delta ** 2, axis=0)), rtol=1e-4)
        for model in ("persim", "population"):
            for horizon in ("one_step", "open_loop"):
                assert len(entry[model][horizon]["rmse"]) == 2

    # Personalisation must help here: the level's response to a dose differs
    # in sign between agents, which only the agent factor can carry.
    assert validation["personalisation"]["verdict"] == "helped"
    level = {m: validation["per_dimension"][m]["one_step"]["relative"][0]
             for m in ("persim", "population", "no_change")}
    assert level["persim"] < 0.6 * level["population"], level
    assert level["persim"] < 0.6 * level["no_change"], level
    assert validation["summary"]["persim"]["one_step"] < validation["summary"]["population"][
        "one_step"]

    report_text = (directory / "report.md").read_text()
    assert "**Personalisation helped.**" in report_text
    assert "`p-099`" in report_text and "`obs_level`" in report_text
    for absent in ("num_agents", "episodes", "true_env_mpc", "cached", "(paper)"):
        assert absent not in report_text, absent
    assert results["figures"] == ["tsne_cov_sensitivity.png", "tsne_cov_weight.png"]
    assert "coloured by cov_sensitivity" in report_text


def test_cli_outputs_respect_the_umask_and_leave_no_empty_folder(cli_run):
    result, directory, _ = cli_run
    assert result.returncode == 0
    out = directory.parent.parent
    for folder, subfolders, files in os.walk(out):
        assert subfolders or files, f"empty folder {folder}"
        for name in files:
            assert not name.endswith(".tmp"), name
            mode = stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            assert mode == 0o640, (name, oct(mode))      # 0666 & ~027


def test_saved_simulator_takes_the_users_agent_ids(cli_run):
    result, directory, states = cli_run
    assert result.returncode == 0
    simulator = Simulator.load(directory / "simulator_trial0.msgpack")
    index = sorted(IDS).index("p-099")
    obs, action = states["p-099"][3].astype(np.float32), np.array([0.5], np.float32)
    np.testing.assert_array_equal(simulator.predict("p-099", obs, action),
                                  simulator.predict(index, obs, action))
    np.testing.assert_array_equal(simulator.rollout(["p-099", "p-003"], np.stack([obs, obs]),
                                                    np.full((4, 2, 1), 0.5, np.float32)),
                                  simulator.rollout(np.array([index, 0]), np.stack([obs, obs]),
                                                    np.full((4, 2, 1), 0.5, np.float32)))
    factors = simulator.agent_factors(member=None)
    np.testing.assert_array_equal(simulator.agent_factors(member=None, agents=["p-099"]),
                                  factors[:, index:index + 1])
    with np.load(directory / "agent_factors.npz") as stored:
        assert list(stored["agent_keys"]) == sorted(IDS)
    with pytest.raises(ValueError) as error:
        simulator.predict("p-100", obs, action)
    assert "'p-100' is not one of the 8 agent ids ('p-003'" in str(error.value)
    with pytest.raises(ValueError, match=r"index 8 is outside 0\.\.7.*agent_index\(8\)"):
        simulator.predict(8, obs, action)


# Each bad input: (name, how to change the rows (a list of lists, header
# first), extra flags, what the one error line must say).
def _set(row: int, column: str, value: str):
    def edit(rows):
        rows[row][HEADER.index(column)] = value
    return edit


BAD_INPUTS = [
    ("default agent column", None, ["--agent_column=agent_id"],
     ["--agent_column: column 'agent_id' not found", "'patient'"]),
    ("missing time column", None, ["--time_column=day"], ["'day' not found", "--time_column=''"]),
    ("covariate varies", _set(30, "cov_weight", "61"), [],
     ["column 'cov_weight'", "line 31", "--covariate_prefix"]),
    ("1e30 in a state", _set(57, "obs_level", "1e30"), [],
     ["column 'obs_level'", "line 58", "1e+30", "--allow_outliers"]),
    ("1e30 in a mostly-zero column", _set(57, "obs_bolus", "1e30"), [],
     ["column 'obs_bolus'", "line 58", "--allow_outliers"]),
    ("1e39", _set(57, "obs_level", "1e39"), ["--allow_outliers"],
     ["column 'obs_level'", "line 58", "float32"]),
    ("NaN", _set(57, "obs_level", "nan"), [], ["column 'obs_level'", "line 58", "NaN"]),
    ("text in an action", _set(9, "action_dose", "high"), [],
     ["column 'action_dose'", "line 10", "'high'"]),
    ("discrete flag on continuous actions", None, ["--discrete_actions"],
     ["column 'action_dose'", "line 2", "not an integer action", "leave out --discrete_actions"]),
    ("no state columns", None, ["--state_prefix=state_"], ["no column starts with 'state_'"]),
    ("open-loop steps", None, ["--open_loop_steps=0"], ["--open_loop_steps"]),
]

# One interpreter runs the CLI's main() on every bad input (the imports
# once): absl parses the flags as on the command line, and anything but
# main's own error line (a traceback) reaches stderr.
DRIVER = textwrap.dedent("""
    import json, sys, io, contextlib, traceback, warnings
    warnings.simplefilter("always")
    from persim_jax import runtime
    from absl import flags
    from experiments import own_data, run
    run.define_flags()
    outcomes = []
    for argv in json.loads(sys.argv[1]):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["run", *argv])
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), warnings.catch_warnings(record=True) as caught:
            try:
                code = run.main(["run"])
            except BaseException:
                traceback.print_exc()
                code = None
        outcomes.append({"code": code, "stderr": stderr.getvalue(),
                         "warnings": [str(w.message) for w in caught]})
    print(json.dumps(outcomes))
""")


def test_cli_bad_inputs_one_line_exit_2_no_output(tmp_path):
    good = tmp_path / "patients.csv"
    make_patients(good, steps=12)
    with open(good, newline="") as handle:
        rows = list(csv.reader(handle))
    argvs = []
    for index, (name, edit, flags_, _) in enumerate(BAD_INPUTS):
        path = good
        if edit is not None:
            path = tmp_path / f"bad{index}.csv"
            changed = [list(row) for row in rows]
            edit(changed)
            with open(path, "w", newline="") as handle:
                csv.writer(handle).writerows(changed)
        argvs.append([f"--dataset={path}", *COLUMN_FLAGS, *flags_, "--epochs=1",
                      f"--out_dir={tmp_path / 'out'}"])
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    for (name, _, _, words), outcome in zip(BAD_INPUTS, outcomes):
        lines = outcome["stderr"].strip().splitlines()
        assert outcome["code"] == 2, (name, outcome)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, outcome["stderr"])
        for word in words:
            assert word in lines[0], (name, word, lines[0])
        assert "np." not in lines[0], (name, lines[0])           # plain values
        assert not outcome["warnings"], (name, outcome["warnings"])
    assert not (tmp_path / "out").exists()


def test_allow_outliers_accepts_a_wild_value(tmp_path):
    path = tmp_path / "wild.csv"
    make_patients(path, steps=12)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    rows[5][HEADER.index("obs_level")] = "1e30"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    options = dict(agent_column="patient", time_column="step", action_prefix="action_")
    with pytest.raises(own_data.UserError, match="line 6"):
        own_data.load_user_file(str(path), options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transitions = own_data.load_user_file(str(path), dict(options, allow_outliers=True))
    largest = max(float(np.max(transitions.obs)), float(np.max(transitions.next_obs)))
    assert largest == pytest.approx(1e30, rel=1e-6)
    assert transitions.agent_keys == tuple(sorted(IDS))


def _relative(persim, population, no_change, open_loop=None):
    arrays = {"one_step": [np.asarray(x, float) for x in (persim, population, no_change)]}
    arrays["open_loop"] = [np.asarray(x, float) for x in (open_loop or (persim, population,
                                                                        no_change))]
    return {(model, horizon): arrays[horizon][i] for horizon in arrays
            for i, model in enumerate(("persim", "population", "no_change"))}


def test_verdict_says_whether_and_for_whom():
    from experiments import personalisation

    ids = ["a", "b", "c"]
    helped = personalisation.verdict(_relative([0.1, 0.5, 0.4], [0.4, 0.5, 0.5], [1, 1, 1]),
                                     ids, 5)
    assert helped["verdict"] == "helped"
    assert helped["one_step"]["better"] == ["a", "c"] and helped["one_step"]["same"] == ["b"]
    assert "It helped most for: a (-75 %), c (-20 %)" in helped["statement"]
    worse = personalisation.verdict(_relative([0.6, 0.6, 0.6], [0.4, 0.5, 0.5], [1, 1, 1]),
                                    ids, 5)
    assert worse["verdict"] == "did not help"
    assert worse["one_step"]["worse"][0] == "a"                # the most hurt first
    assert sorted(worse["one_step"]["worse"]) == ["a", "b", "c"]
    same = personalisation.verdict(_relative([0.5, 0.5, 0.5], [0.51, 0.49, 0.5], [1, 1, 1]),
                                   ids, 5)
    assert same["verdict"] == "no clear difference"
    mixed = personalisation.verdict(
        _relative([0.1, 0.1, 0.1], [0.5, 0.5, 0.5], [1, 1, 1],
                  open_loop=([0.9, 0.9, 0.9], [0.5, 0.5, 0.5], [1, 1, 1])), ids, 5)
    assert mixed["verdict"] == "mixed"
    useless = personalisation.verdict(_relative([0.3, 0.3, 0.3], [0.9, 0.9, 0.9],
                                                [0.2, 0.2, 0.2]), ids, 5)
    assert useless["verdict"] == "helped" and "no better than assuming nothing changes" in (
        useless["statement"])
    no_windows = personalisation.verdict(
        _relative([0.1, 0.5, 0.4], [0.4, 0.5, 0.5], [1, 1, 1],
                  open_loop=([np.nan] * 3, [np.nan] * 3, [np.nan] * 3)), ids, 5)
    assert no_windows["verdict"] == "helped" and "--open_loop_steps" in no_windows["statement"]


def test_open_loop_windows_stay_within_one_logged_chain():
    from experiments import personalisation
    from persim_jax import data

    # Agent 0: 0 -> 1 -> 2 -> (reset) 10 -> 11; agent 1: 20 -> 21 -> 22.
    obs = np.array([0, 1, 10, 20, 21], float)[:, None]
    next_obs = np.array([1, 2, 11, 21, 22], float)[:, None]
    tr = data.make_transitions(obs, np.zeros(5, int), next_obs, np.array([0, 0, 0, 1, 1]),
                               num_actions=1)
    every = np.arange(5)
    np.testing.assert_array_equal(personalisation.open_loop_windows(tr, every, 1), every)
    np.testing.assert_array_equal(personalisation.open_loop_windows(tr, every, 2), [0, 3])
    np.testing.assert_array_equal(personalisation.open_loop_windows(tr, every, 3), [])
    np.testing.assert_array_equal(personalisation.open_loop_windows(tr, np.array([1, 3, 4]), 2),
                                  [3])
