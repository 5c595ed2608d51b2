"""The reproduction record (`experiments.reproduce`): which cells count as
done, the claims checked on a cell's numbers, departures from the paper, and
REPORT.md from recorded cells."""

from __future__ import annotations

import json
import os

import pytest
from absl import app

from experiments import claims, report, reproduce

NOTES = claims.load_notes()
BY_TEXT = {claim.text: claim for claim in claims.CLAIMS}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Episode noise of every method in `_results`: mean 0, std ~0.9, 5 episodes.
NOISE = [-1.0, 1.0, -1.0, 1.0, 0.0]


def _reward(mean):
    returns = [[[mean + e for e in NOISE] for _ in range(5)]]          # (1 trial, 5, 5)
    return {"mean": [mean] * 5, "std": [0.894] * 5, "returns": returns}


def _prediction(rmse):
    return {"rmse": [rmse] * 5, "rmse_std": [0.001] * 5, "r2_median": [0.9] * 5,
            "episodes": 50, "trials": 1}


def _results(persim_rmse, persim_reward, **others):
    """A results.json of MountainCar / random with `others` = {method: (rmse or
    None, reward mean)}: every method's returns are its mean plus NOISE."""
    methods = {"persim": {"prediction": _prediction(persim_rmse),
                          "reward": _reward(persim_reward)}}
    for name, (rmse, reward) in others.items():
        methods[name] = {"prediction": None if rmse is None else _prediction(rmse),
                         "reward": _reward(reward)}
    return {"env": "mountaincar", "dataset": "random", "preset": "quick",
            "test_agents": [[0.0001], [0.0005], [0.001], [0.0025], [0.0035]],
            "covariate_names": ["gravity"], "prediction": methods["persim"]["prediction"],
            "reward": {"persim": methods["persim"]["reward"], "episodes": 5, "trials": 1,
                       "std_over": "episodes"},
            "config": {"true_env_mpc": True, "policy_episodes": 20}, "methods": methods,
            "timing_s": {"dataset": 5.0, "dataset_generation": 4.0, "train": 10.0,
                         "total": 3.0}}


def test_claims_have_verdicts_with_intervals_and_done():
    results = _results(0.01, -120.0, vanilla_cadm=(0.5, -120.0), bcq_p=(None, -100.0),
                       true_env_mpc=(None, -150.0), population=(0.2, -200.0))
    verdicts = {claim.text: claim.verdict(results) for claim in claims.CLAIMS}
    predicted = verdicts["PerSim predicts better than Vanilla CaDM"]
    assert predicted.outcome == "holds"
    assert predicted.interval.low < predicted.interval.difference < predicted.interval.high < 0
    assert "episode noise only" in predicted.interval.over
    # The same mean reward: the interval covers 0.
    same = verdicts["PerSim earns more than Vanilla CaDM"]
    assert same.outcome == "inconclusive" and same.interval.low < 0 < same.interval.high
    assert verdicts["PerSim earns more than BCQ-P"].outcome == "fails"
    assert "5 episodes vs 1 trial × 5 episodes" not in verdicts[
        "PerSim earns more than BCQ-P"].interval.over
    assert verdicts["PerSim is within True env + MPC's spread"].outcome == "holds"
    assert verdicts["The population model earns less than PerSim"].outcome == "holds"
    assert verdicts["PerSim predicts better than PE-TS CaDM"] is None          # not run
    assert reproduce.is_done(results, "quick", ["persim", "bcq_p"])
    assert not reproduce.is_done(results, "quick", ["all"])
    assert not reproduce.is_done(results, "paper", ["persim"])


def test_one_episode_of_one_trial_is_inconclusive_and_printed_without_spread():
    results = _results(0.01, 300.0, bcq_p=(None, -100.0))
    for row in (results["methods"]["persim"]["reward"], results["methods"]["bcq_p"]["reward"]):
        row["returns"] = [[[m] for m in row["mean"]]]                     # (1, 5, 1)
        row["std"] = [0.0] * 5
    verdict = BY_TEXT["PerSim earns more than BCQ-P"].verdict(results)
    assert verdict.outcome == "inconclusive" and verdict.interval.low is None
    assert "no noise to resample" in verdict.interval.over
    text = report.reward_section(results, {})
    assert "300.0 ± –" in text and "one episode of one trial, no spread" in text


def test_the_papers_own_numbers_get_their_own_verdicts():
    bcq = BY_TEXT["PerSim earns more than BCQ-P"].paper_verdict("halfcheetah", "pure")
    assert bcq.outcome == "fails" and not bcq.means_only
    assert bcq.interval.high < 0 and "5 trials" in bcq.interval.over
    # MountainCar / pure: the paper's PerSim above its BCQ-P, inside its trials' noise.
    assert BY_TEXT["PerSim earns more than BCQ-P"].paper_verdict(
        "mountaincar", "pure").outcome == "inconclusive"
    prediction = BY_TEXT["PerSim predicts better than Vanilla CaDM"].paper_verdict(
        "cartpole", "pure")
    assert prediction.outcome == "holds" and prediction.means_only
    assert BY_TEXT["The population model predicts worse than PerSim"].paper_verdict(
        "cartpole", "pure") is None


def test_a_claim_that_does_not_hold_says_what_is_known_about_it():
    results = _results(0.01, -120.0, bcq_p=(None, -100.0), true_env_mpc=(None, -119.5),
                       vanilla_cadm=(0.5, -110.0))
    bcq = claims.claim_notes(results, BY_TEXT["PerSim earns more than BCQ-P"], NOTES)
    assert bcq[0].startswith("Hypothesis: ") and "bootstraps on `done`" in bcq[0]
    assert "`python -m experiments.diagnostics.bcq_bootstrap --record`" in bcq[0]
    assert bcq[1] == ("BCQ-P (-100.0) also earns more than True env + MPC (-119.5), the paper's "
                      "planner on each agent's exact dynamics.")
    # Where PerSim too earns more than True env + MPC, the record says it is no upper bound.
    above = _results(0.01, -110.0, bcq_p=(None, -100.0), true_env_mpc=(None, -119.5))
    assert "no upper bound" in claims.claim_notes(
        above, BY_TEXT["PerSim earns more than BCQ-P"], NOTES)[-1]
    assert len(claims.claim_notes(results, BY_TEXT["PerSim earns more than Vanilla CaDM"],
                                  NOTES)) == 1
    # HalfCheetah / pure: the paper's own BCQ-P earns more than its PerSim.
    cheetah = dict(results, env="halfcheetah", dataset="pure")
    assert claims.claim_notes(cheetah, BY_TEXT["PerSim earns more than BCQ-P"], NOTES)[
        0].startswith("On the paper's own numbers: fails (PerSim 451.7, BCQ-P 1505), difference")
    # A note of one preset's size stays out of the other preset's record.
    cheetah = dict(results, env="halfcheetah", dataset="random")
    quick_cause = NOTES.causes[("persim", "halfcheetah", "random", "quick")]
    assert claims.known_cause(NOTES.causes, dict(cheetah, preset="quick"), "persim") is quick_cause
    assert claims.known_cause(NOTES.causes, dict(cheetah, preset="paper"), "persim") is None
    ids = {claim.id for claim in claims.CLAIMS}
    assert {key[0] for key in NOTES.claims} <= ids
    assert {key[0] for key in NOTES.causes} <= set(claims.ALL_METHODS)
    assert all(key[1] in claims.ALL_ENVS and key[2] in reproduce.DATASETS
               for key in (*NOTES.claims, *NOTES.causes))


def test_every_note_rests_on_a_committed_file_that_supplies_its_numbers():
    with open(claims.NOTES_PATH, encoding="utf-8") as handle:
        raw = json.load(handle)
    entries = raw["departure_causes"] + raw["claim_notes"]
    assert len(entries) == len(NOTES.causes) + len(NOTES.claims)
    for index, entry in enumerate(entries):
        note = claims.resolve_note(entry, f"entry {index}")
        assert note.kind in claims.NOTE_KINDS and note.command.startswith("python -m ")
        assert note.files[0] == entry["file"]
        assert all(os.path.isfile(os.path.join(ROOT, name)) for name in note.files)
        assert "{" not in note.text and "}" not in note.text     # every placeholder filled
    # The numbers come from the files: the BCQ-P notes of the pure datasets quote the
    # paper's BCQ-P (not -500) and ours from the cell's results.json.
    pure = NOTES.claims[("reward_vs_bcq_p", "mountaincar", "pure")]
    assert "-67.6, -68.6, -79.2, -267.8, -295.1" in pure.text
    assert "-106.2, -134.0" in pure.text
    assert NOTES.causes[("bcq_p", "mountaincar", "random")].kind == "hypothesis"
    assert NOTES.causes[("bcq_p", "mountaincar", "random")].file == (
        "experiments/results/quick/mountaincar/random/bcq_bootstrap.json")


def test_a_note_reads_its_numbers_from_its_file_and_is_refused_without_it(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(
        {"agents": [{"r": 0.12345, "n": 3}, {"r": 0.5, "n": 4}, {"r": 0.25, "n": 5}]}))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for row in (
        {"planner": "a", "agent": 0, "value": 10.0}, {"planner": "a", "agent": 1, "value": 20.0},
        {"planner": "b", "agent": 0, "value": -1.0})))
    entry = {"id": "x", "method": "persim", "env": "mountaincar", "dataset": "random",
             "kind": "measurement", "file": "m.json", "command": "python -m x",
             "text": "first {first}, two {two}, most {most}, mean {mean}",
             "values": {"first": "agents/0/r",
                        "two": {"path": "agents/0:2/n", "format": "d"},
                        "most": {"path": "agents/*/r", "reduce": "max", "format": ".2f"},
                        "mean": {"file": "rows.jsonl", "where": {"planner": "a"},
                                 "path": "*/value", "reduce": "mean", "format": ".1f"}}}
    notes_path = tmp_path / "notes.json"

    def load(**changes):
        notes_path.write_text(json.dumps({"departure_causes": [dict(entry, **changes)]}))
        return claims.load_notes(notes_path, root=str(tmp_path))

    note = load().causes[("persim", "mountaincar", "random")]
    assert note.text == "first 0.123, two 3, 4, most 0.50, mean 15.0"
    assert note.files == ("m.json", "rows.jsonl")
    assert note.render().startswith("Measured: first 0.123") and "`python -m x`" in note.render()
    with pytest.raises(ValueError, match="measurement file gone.json is missing"):
        load(file="gone.json")
    with pytest.raises(ValueError, match="value 'first'.*does not resolve"):
        load(values=dict(entry["values"], first="agents/7/r"))
    with pytest.raises(ValueError, match="placeholders"):
        load(text="first {first} and {typed}")
    with pytest.raises(ValueError, match="kind"):
        load(kind="guess")


def test_notes_are_keyed_to_known_claims_and_cells(tmp_path):
    assert os.path.dirname(claims.NOTES_PATH) == reproduce.RECORD_DIR
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


def test_departures_name_agents_their_interval_and_known_causes():
    results = _results(0.01, -120.0, bcq_p=(None, -100.0))
    lines = claims.departures(results, NOTES)
    # PerSim's RMSE 0.01 against the paper's 0.001; BCQ-P's -100 against -500 ± 0.
    assert any(line.startswith("PerSim, prediction RMSE") for line in lines)
    bcq = [line for line in lines if line.startswith("BCQ-P, reward")]
    assert bcq and "(gravity=0.0001) -100.0 vs -500, difference +400.0 ± 0.9" in bcq[0]
    assert "Hypothesis: " in bcq[0] and "bootstraps on `done`" in bcq[0]
    # PerSim's -120 against the paper's -53.66 ± 0.75: far outside both noises.
    assert any("(gravity=0.0001) -120.0 vs -53.66" in line for line in lines)


def test_report_from_the_record(tmp_path):
    cell = tmp_path / "quick" / "mountaincar" / "random"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(json.dumps(
        _results(0.01, -120.0, vanilla_cadm=(0.5, -300.0), bcq_p=(None, -100.0))))
    path = reproduce.write_report(str(tmp_path), "quick")
    text = open(path, encoding="utf-8").read()
    assert "1 of 12 env × dataset cells recorded" in text
    # The settings first, beside the paper's; the quick cells called indicative.
    assert text.index("## Settings: preset `quick`") < text.index("## Headline")
    assert "| minibatch | 256 | **32** | **64** | 256 |" in text
    assert "**The quick cells are indicative, not a reproduction**" in text
    # Trials and episodes per cell; stage seconds without the nested dataset
    # generation, beside the last run's own seconds.
    assert "| 8 | 1 | 5 / 20 / 50 | 15 | 3 | – |" not in text
    assert "| 3 | 1 | 5 / 20 / 50 | 15 | 3 | – |" in text
    # Ours, then (in brackets) the check on the paper's own numbers for the cell.
    assert ("| PerSim predicts better than Vanilla CaDM | holds (holds†) | "
            "1 / 0 / 0 (1 / 0 / 0) |") in text
    assert "| The population model predicts worse than PerSim | – | not run |" in text
    assert "In all, of 3 checks on our numbers: 2 hold, 1 fails, 0 are inconclusive." in text
    assert "## MountainCar / Random" in text and "Vanilla CaDM (paper)" in text
    assert "- PerSim earns more than BCQ-P, **MountainCar / Random** (fails): Hypothesis: " in text
    assert "The paper's ± is the std over its 5 trials." in text
    assert "| PerSim earns more than BCQ-P | -120.0 | -100.0 | -20.0 [" in text


def test_the_papers_counts_leave_out_claims_not_run_at_this_size(tmp_path):
    cell = tmp_path / "paper" / "cartpole" / "pure"
    cell.mkdir(parents=True)
    results = dict(_results(0.01, 190.0, true_env_mpc=(None, 189.0)), env="cartpole",
                   dataset="pure", preset="paper")
    (cell / "results.json").write_text(json.dumps(results))
    text = reproduce.render(str(tmp_path), "paper")
    assert "| PerSim earns more than BCQ-P | – (holds) | not run |" in text
    assert ("on the paper's own numbers (1 check, where ours ran and the paper has both "
            "methods): 1 holds") in text
    assert "Departures of this preset from the paper's text: MountainCar minibatch 32; " \
           "CartPole minibatch 64" in text


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


def _write_rerun(record_dir, preset, env, dataset, rerun) -> int:
    """What a fake `reproduce.run_cell` leaves: the re-run's results.json in
    its record folder; returns run_cell's exit code."""
    target = os.path.join(record_dir, preset, env, dataset)
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "results.json"), "w") as handle:
        json.dump(rerun, handle)
    return 0


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
        rerun["cpu"] = "another CPU"                  # reported beside, not a difference
        if len(calls) == 2:
            rerun["methods"]["persim"]["reward"]["mean"][0] = -121.0
        return _write_rerun(record_dir, preset, env, dataset, rerun)

    monkeypatch.setattr(reproduce, "run_cell", fake_run_cell)
    assert reproduce.verify_cell("mountaincar", "random", "quick", str(tmp_path / "s1"), str(record))
    methods, out_dir, data_dir = calls[0]
    assert methods == ["persim", "vanilla_cadm"]
    assert out_dir.startswith(str(tmp_path / "s1")) and data_dir.startswith(str(tmp_path / "s1"))
    outcome = json.loads((cell / "rerun.json").read_text())
    assert outcome["identical"] and outcome["seconds_rerun"] == 2.0
    assert (outcome["cpu_recorded"], outcome["cpu_rerun"]) == (None, "another CPU")
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


def test_verify_methods_reruns_a_subset_and_compares_all_but_the_others(tmp_path, monkeypatch):
    record = tmp_path / "record"
    cell = record / "quick" / "mountaincar" / "random"
    cell.mkdir(parents=True)
    results = _results(0.01, -120.0, vanilla_cadm=(0.5, -300.0))
    results["config"].update(methods=["persim", "vanilla_cadm"], epochs=10)
    (cell / "results.json").write_text(json.dumps(results))
    calls = []

    def fake_run_cell(env, dataset, preset, methods, out_dir, data_dir, record_dir):
        calls.append(methods)
        rerun = reproduce.without_methods(json.loads(json.dumps(results)), frozenset({"vanilla_cadm"}))
        rerun["reward"]["vanilla_cadm"] = None    # a method not run is written as null
        if len(calls) == 2:
            rerun["config"]["epochs"] = 11           # a setting is compared whole
        return _write_rerun(record_dir, preset, env, dataset, rerun)

    monkeypatch.setattr(reproduce, "run_cell", fake_run_cell)
    assert reproduce.verify_cell("mountaincar", "random", "quick", str(tmp_path / "s1"),
                                 str(record), ["persim"])
    assert calls == [["persim"]]
    outcome = json.loads((cell / "rerun.json").read_text())
    assert outcome["methods_not_rerun"] == ["vanilla_cadm"] and outcome["identical"]
    assert "not re-run: vanilla_cadm" in reproduce.render(str(record), "quick")
    assert not reproduce.verify_cell("mountaincar", "random", "quick", str(tmp_path / "s2"),
                                     str(record), ["persim"])
    assert json.loads((cell / "rerun.json").read_text())["differences"] == [
        "/config/epochs: 10 != 11"]
    with pytest.raises(app.UsageError, match="bcq_p not recorded"):
        reproduce.verify_cell("mountaincar", "random", "quick", str(tmp_path / "s3"),
                              str(record), ["bcq_p"])


def test_carry_over_seeds_a_dataset_independent_reward_the_run_then_reuses(tmp_path,
                                                                          monkeypatch):
    """True env + MPC recorded in one cell is reused by another cell's run
    without planning; a record made with other episodes is not carried."""
    import dataclasses

    import envs
    import numpy as np
    from experiments import config as config_lib, pipeline, stages
    from experiments.cache import RunDirectory

    env = envs.make("mountaincar")
    config = config_lib.resolve("mountaincar", "random", "quick")
    planner = stages.planner_for(env, config)
    results = _results(0.01, -120.0, true_env_mpc=(None, -90.0))
    results.update(test_agents=env.test_agents.tolist(), seed=0,
                   config={"planner": stages.planner_description(planner),
                           "episodes": config.episodes, "max_steps": config.max_steps})
    record = tmp_path / "record"
    source = record / "quick" / "mountaincar" / "pure"
    source.mkdir(parents=True)
    (source / "results.json").write_text(json.dumps(results))

    run_dir = str(tmp_path / "run")
    carried = reproduce.carry_over("mountaincar", "random", "quick", ["persim", "true_env_mpc"],
                                   run_dir, str(record))
    assert carried == {"true_env_mpc": "quick/mountaincar/pure"}     # PerSim trains: not carried

    def no_planning(*args, **kwargs):
        raise AssertionError("the carried result was not reused")
    monkeypatch.setattr(stages, "episode_returns", no_planning)
    method, = [m for m in pipeline.methods_for(env, dataclasses.replace(
        config, methods=("true_env_mpc",))) if m.name == "true_env_mpc"]
    reused = stages.reward_stage(RunDirectory(run_dir, force=False), env, method, [None],
                                 env.test_agents, np.arange(5), planner, config, 0, "any")
    assert reused == results["methods"]["true_env_mpc"]["reward"]

    results["config"]["episodes"] = config.episodes + 1
    (source / "results.json").write_text(json.dumps(results))
    assert reproduce.carry_over("mountaincar", "random", "quick", ["true_env_mpc"],
                                str(tmp_path / "other"), str(record)) == {}


def test_run_cell_records_the_new_cell_and_drops_the_old_records_rerun(tmp_path, monkeypatch):
    """A re-recorded cell loses the re-run outcome of the record it replaced."""
    record = tmp_path / "record"
    cell = record / "quick" / "mountaincar" / "random"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(json.dumps(_results(0.01, -120.0)))
    (cell / reproduce.RERUN_FILE).write_text(json.dumps({"identical": True, "date": "old"}))
    new = _results(0.02, -110.0)

    def fake_run(command):
        work = next(a.split("=", 1)[1] for a in command if a.startswith("--out_dir="))
        run = os.path.join(work, "mountaincar", "random")
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "results.json"), "w") as handle:
            json.dump(new, handle)
        with open(os.path.join(run, "report.md"), "w") as handle:
            handle.write("# report\n")
        return 0
    monkeypatch.setattr(reproduce.subprocess, "call", fake_run)
    assert reproduce.run_cell("mountaincar", "random", "quick", ["persim"], str(tmp_path / "runs"),
                              str(tmp_path / "data"), str(record)) == 0
    assert json.loads((cell / "results.json").read_text()) == new
    assert not (cell / reproduce.RERUN_FILE).exists()
    assert reproduce._rerun_mark(str(record), "quick", new) == report.DASH


def test_reward_against_the_paper_is_the_difference_of_means_with_both_errors():
    import math

    from experiments import paper
    results = _results(0.01, -120.0)
    theirs = paper.paper_rows("mountaincar", "random")["reward"]["persim"]
    found = claims.reward_against_paper(results)
    assert found.difference == pytest.approx(-120.0 - sum(theirs["mean"]) / 5)
    ours_se = [1.0 / math.sqrt(5)] * 5                  # NOISE's std (ddof 1) is 1, 5 episodes
    se = math.sqrt(sum(o ** 2 + (t / math.sqrt(5)) ** 2
                       for o, t in zip(ours_se, theirs["std"]))) / 5
    assert found.high - found.difference == pytest.approx(1.959964 * se, rel=1e-3)
    assert claims.reward_against_paper(results, "bcq_a") is None         # no row of ours
