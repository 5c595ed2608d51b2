"""The reproduction record (`experiments.reproduce`): which cells count as
done, the claims checked on a cell's numbers, departures from the paper, and
REPORT.md from recorded cells."""

from __future__ import annotations

import json
import os

import pytest

from experiments import claims, reproduce

NOTES = claims.load_notes()
BY_TEXT = {claim.text: claim for claim in claims.CLAIMS}


def _results(persim_rmse, persim_reward, **others):
    """A results.json of MountainCar / random with `others` = {method: (rmse or
    None, reward mean)}; std 1 everywhere."""
    methods = {"persim": {"prediction": {"rmse": [persim_rmse] * 5, "r2_median": [1.0] * 5},
                          "reward": {"mean": [persim_reward] * 5, "std": [1.0] * 5}}}
    for name, (rmse, reward) in others.items():
        methods[name] = {"prediction": None if rmse is None else
                         {"rmse": [rmse] * 5, "r2_median": [0.5] * 5},
                         "reward": {"mean": [reward] * 5, "std": [1.0] * 5}}
    return {"env": "mountaincar", "dataset": "random", "preset": "quick",
            "test_agents": [[0.0001], [0.0005], [0.001], [0.0025], [0.0035]],
            "covariate_names": ["gravity"], "prediction": methods["persim"]["prediction"],
            "reward": {"persim": methods["persim"]["reward"], "episodes": 5, "trials": 1},
            "config": {"true_env_mpc": True}, "methods": methods, "timing_s": {"train": 10.0}}


def test_claims_and_done():
    results = _results(0.01, -120.0, vanilla_cadm=(0.5, -300.0), bcq_p=(None, -100.0),
                       true_env_mpc=(None, -119.5), population=(0.2, -200.0))
    checks = {claim.text: claim.check(results) for claim in claims.CLAIMS}
    assert checks["PerSim predicts better than Vanilla CaDM"] is True
    assert checks["PerSim earns more than Vanilla CaDM"] is True
    assert checks["PerSim earns more than BCQ-P"] is False
    assert checks["PerSim is within True env + MPC's spread"] is True       # -120 >= -119.5 - 1
    assert checks["PerSim predicts better than PE-TS CaDM"] is None         # not run
    assert reproduce.is_done(results, "quick", ["persim", "bcq_p"])
    assert not reproduce.is_done(results, "quick", ["all"])
    assert not reproduce.is_done(results, "paper", ["persim"])


def test_a_failing_claim_says_what_is_measured_about_it():
    results = _results(0.01, -120.0, bcq_p=(None, -100.0), true_env_mpc=(None, -119.5),
                       vanilla_cadm=(0.5, -110.0))
    bcq = claims.claim_notes(results, BY_TEXT["PerSim earns more than BCQ-P"], NOTES)
    assert "bootstraps on `done`" in bcq[0]
    assert bcq[1].startswith("BCQ-P (-100.0) also earns more than True env + MPC (-119.5)")
    assert len(claims.claim_notes(results, BY_TEXT["PerSim earns more than Vanilla CaDM"],
                                  NOTES)) == 1
    # HalfCheetah / pure: the paper's own BCQ-P earns more than its PerSim.
    cheetah = dict(results, env="halfcheetah", dataset="pure")
    assert claims.claim_notes(cheetah, BY_TEXT["PerSim earns more than BCQ-P"], NOTES)[0] == (
        "The paper's own numbers do not hold it either (PerSim 451.7, BCQ-P 1505).")
    # A note of one preset's size stays out of the other preset's record.
    cheetah = dict(results, env="halfcheetah", preset="paper")
    assert claims.claim_notes(cheetah, BY_TEXT["PerSim earns more than Vanilla CaDM"],
                              NOTES)[:1] != [
        NOTES.claims[("reward_vs_vanilla_cadm", "halfcheetah", "random", "quick")].text]
    ids = {claim.id for claim in claims.CLAIMS}
    assert {key[0] for key in NOTES.claims} <= ids
    assert {key[0] for key in NOTES.causes} <= set(claims.ALL_METHODS)
    assert all(key[1] in claims.ALL_ENVS and key[2] in reproduce.DATASETS
               for key in (*NOTES.claims, *NOTES.causes))


def test_notes_are_data_beside_the_record_and_name_their_sources(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(claims.NOTES_PATH) == reproduce.RECORD_DIR
    for note in (*NOTES.claims.values(), *NOTES.causes.values()):
        assert note.text and all(os.path.isfile(os.path.join(root, source))
                                 for source in note.sources)
    # The BCQ-P cause names the file that measured it.
    assert NOTES.causes[("bcq_p", "mountaincar", "random")].sources == (
        "experiments/results/quick/mountaincar/random/bcq_bootstrap.json",)
    # A note keyed to an unknown claim or env is refused, naming the field.
    bad = tmp_path / "notes.json"
    bad.write_text(json.dumps({"claim_notes": [
        {"claim": "persim_is_best", "env": "mountaincar", "dataset": "random", "text": "x"}]}))
    with pytest.raises(ValueError, match="claim 'persim_is_best'"):
        claims.load_notes(bad)
    bad.write_text(json.dumps({"departure_causes": [
        {"method": "persim", "env": "pendulum", "dataset": "random", "text": "x"}]}))
    with pytest.raises(ValueError, match="env 'pendulum'"):
        claims.load_notes(bad)


def test_each_claim_names_the_methods_section_and_direction_it_compares():
    claim = claims.CLAIMS_BY_ID["prediction_vs_vanilla_cadm"]
    assert (claim.method, claim.other, claim.section, claim.field, claim.direction) == (
        "persim", "vanilla_cadm", "prediction", "rmse", "lower")
    assert {c.other for c in claims.CLAIMS} <= set(claims.ALL_METHODS)
    with pytest.raises(ValueError, match="direction"):
        claims.Claim("x", "x", "bcq_p", "reward", "sideways", "baseline")


def test_departures_name_agents_and_known_causes():
    results = _results(0.01, -120.0, bcq_p=(None, -100.0))
    lines = claims.departures(results, NOTES)
    # PerSim's RMSE 0.01 against the paper's 0.001; BCQ-P's -100 against -500 ± 0.
    assert any(line.startswith("PerSim, prediction RMSE") for line in lines)
    bcq = [line for line in lines if line.startswith("BCQ-P, reward")]
    assert bcq and "(gravity=0.0001) -100.0 vs -500" in bcq[0] and "bootstraps on `done`" in bcq[0]


def test_report_from_the_record(tmp_path):
    cell = tmp_path / "quick" / "mountaincar" / "random"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(json.dumps(
        _results(0.01, -120.0, vanilla_cadm=(0.5, -300.0), bcq_p=(None, -100.0))))
    path = reproduce.write_report(str(tmp_path), "quick")
    text = open(path, encoding="utf-8").read()
    assert "1 of 12 env × dataset cells recorded" in text
    # Ours, then (in brackets) the check on the paper's own numbers for the cell.
    assert "| PerSim predicts better than Vanilla CaDM | yes (yes) | 1 / 1 (1 / 1) |" in text
    assert "| The population model predicts worse than PerSim | – | 0 / 0 |" in text
    assert "## MountainCar / Random" in text and "Vanilla CaDM (paper)" in text
    assert "- PerSim earns more than BCQ-P, **MountainCar / Random**: The paper's BCQ-P" in text


def test_differences_ignore_timings_and_name_each_changed_number():
    a = _results(0.01, -120.0, vanilla_cadm=(0.5, -300.0))
    b = json.loads(json.dumps(a))
    b["timing_s"]["train"] = 99.0
    b["methods"]["persim"]["train_seconds"] = 3.0           # a timing: never compared
    assert reproduce.differences(a, b) == []
    b["methods"]["vanilla_cadm"]["reward"]["mean"][3] = -299.0
    b["seed"] = 1
    assert reproduce.differences(a, b) == [
        "/methods/vanilla_cadm/reward/mean[3]: -300.0 != -299.0", "/seed: only in the re-run"]


def test_verify_writes_the_outcome_beside_the_cell_and_the_report_shows_it(tmp_path, monkeypatch):
    record = tmp_path / "record"
    cell = record / "quick" / "mountaincar" / "random"
    cell.mkdir(parents=True)
    results = _results(0.01, -120.0, vanilla_cadm=(0.5, -300.0))
    (cell / "results.json").write_text(json.dumps(results))
    calls = []

    def fake_run_cell(env, dataset, preset, methods, out_dir, data_dir, record_dir):
        calls.append((methods, out_dir, data_dir))
        rerun = json.loads(json.dumps(results))
        rerun["timing_s"] = {"train": 1.0, "total": 2.0}
        if len(calls) == 2:
            rerun["methods"]["persim"]["reward"]["mean"][0] = -121.0
        target = os.path.join(record_dir, preset, env, dataset)
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "results.json"), "w") as handle:
            json.dump(rerun, handle)
        return 0

    monkeypatch.setattr(reproduce, "run_cell", fake_run_cell)
    assert reproduce.verify_cell("mountaincar", "random", "quick", str(tmp_path / "s1"), str(record))
    methods, out_dir, data_dir = calls[0]
    assert methods == ["persim", "vanilla_cadm"]
    assert out_dir.startswith(str(tmp_path / "s1")) and data_dir.startswith(str(tmp_path / "s1"))
    outcome = json.loads((cell / "rerun.json").read_text())
    assert outcome["identical"] and outcome["seconds_rerun"] == 2.0
    assert "identical (" in reproduce.render(str(record), "quick")

    assert not reproduce.verify_cell("mountaincar", "random", "quick", str(tmp_path / "s2"),
                                     str(record))
    outcome = json.loads((cell / "rerun.json").read_text())
    assert outcome["differences"] == ["/methods/persim/reward/mean[0]: -120.0 != -121.0"]
    assert "**differs**: 1 fields" in reproduce.render(str(record), "quick")


def test_a_cell_recorded_under_other_settings_is_not_done():
    from experiments import config as config_lib
    import dataclasses
    current = json.loads(json.dumps(dataclasses.asdict(
        config_lib.resolve("mountaincar", "random", "quick"))))
    results = _results(0.01, -120.0)
    results["config"] = dict(current, methods=["persim"])
    assert reproduce.settings_changed(results, "quick") == []
    assert reproduce.is_done(results, "quick", ["persim"])
    results["config"]["standardize"] = not current["standardize"]
    assert reproduce.settings_changed(results, "quick") == [
        f"standardize: {not current['standardize']!r} -> {current['standardize']!r}"]
    assert not reproduce.is_done(results, "quick", ["persim"])


def test_prediction_coverage_counts_visited_states_inside_the_logged_box():
    import numpy as np
    from experiments.diagnostics import prediction_coverage

    logged = np.array([[0.0, -1.0], [1.0, 1.0], [0.5, 0.0]])
    visited = np.array([[0.5, 0.5], [1.5, 0.0], [0.2, -2.0], [1.0, -1.0]])
    row = prediction_coverage.coverage(logged, visited)
    assert row["logged_steps"] == 3
    assert row["logged_low"] == [0.0, -1.0] and row["logged_high"] == [1.0, 1.0]
    assert row["visited_low"] == [0.2, -2.0] and row["visited_high"] == [1.5, 0.5]
    assert row["inside_fraction"] == 0.5          # (0.5, 0.5) and (1, -1), edges included


def test_mountaincar_wall_splits_the_windows_that_reach_it():
    import numpy as np
    from experiments.diagnostics import mountaincar_wall

    true = np.zeros((3, 4, 2))
    true[0, 2, 0] = -1.2                                  # window 0 reaches the wall
    true[1, 3, 0] = -1.2                                  # window 1 only after its end
    predicted = true + np.array([1.0, 2.0, 5.0])[:, None, None]
    valid = np.ones((3, 4), bool)
    valid[1, 3] = False
    row = mountaincar_wall.split_by_wall(true, predicted, valid)
    assert row["windows"] == 3 and row["wall_fraction"] == round(1 / 3, 3)
    assert row["rmse_with_wall"] == 1.0 and row["rmse_without_wall"] == 3.5    # (2 + 5) / 2
    assert row["rmse"] == round(8 / 3, 5)
    none = mountaincar_wall.split_by_wall(true[1:], predicted[1:], valid[1:])
    assert none["wall_fraction"] == 0.0 and none["rmse_with_wall"] is None


def test_paper_cost_scales_each_stage_by_the_protocols_work():
    from benchmarks import reproduction_cost as cost

    # CartPole: trials 1 -> 5, BCQ 5e4 -> 5.5e5 iterations, 5 -> 20 episodes, PE-TS 5 -> 20 particles.
    assert cost.scale("cartpole", "train", "bcq_a", 1e5) == 5 * 11
    assert cost.scale("cartpole", "train", "persim", 1e5) == 5 * 300 / 200
    assert cost.scale("cartpole", "train", "vanilla_cadm", 1e5) == 5 * 100 * 1e5 / (4 * 5e4)
    assert cost.scale("cartpole", "reward", "pe_ts_cadm", 1e5) == 4 * 5 * 4
    assert cost.scale("cartpole", "reward", "true_env_mpc", 1e5) == 4
    assert cost.scale("cartpole", "prediction", "persim", 1e5) == 5 * 200 / 50
