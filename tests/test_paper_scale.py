"""The paper-scale command (`experiments.paper_scale`): its dry run, end to
end at a tiny size (the cost report, the cell as a subprocess, the timings),
a rerun that resumes, the cost report's structure and bad requests."""

from __future__ import annotations

import json
import os

import pytest

from experiments import cli, paper_scale
from experiments.config import UserError

MEASURED = ("dataset", "train_persim", "reward_persim")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of CartPole / pure with PerSim (the cost report in this
    process, the cell as `experiments.run`'s subprocess): (folder, exit code)."""
    out = str(tmp_path_factory.mktemp("paper_scale"))
    code = paper_scale.run(["cartpole"], ["pure"], ["persim"], out, os.path.join(out, "data"),
                           os.path.join(out, "record"), dict(paper_scale.DRY_RUN))
    return out, code


def _load(out, name):
    with open(os.path.join(out, "paper", name), encoding="utf-8") as handle:
        return json.load(handle)


def test_dry_run_runs_the_cell_and_writes_its_timings(dry_run):
    out, code = dry_run
    assert code == 0
    record = os.path.join(out, "record", "paper", "cartpole", "pure")
    with open(os.path.join(record, "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    assert results["preset"] == "paper"
    assert results["config"]["num_agents"] == paper_scale.DRY_RUN["num_agents"]
    assert results["config"]["epochs"] == 1 and results["config"]["max_steps"] == 3
    assert os.path.exists(os.path.join(out, "record", "paper", "REPORT.md"))
    cell = _load(out, paper_scale.TIMINGS_FILE)["cells"]["cartpole/pure"]
    assert cell["stage_seconds"]["train_persim_trial0"] > 0
    assert cell["stage_seconds"]["reward_persim"] > 0
    assert cell["expected_seconds"] > 0
    assert set(cell["expected_stage_seconds"]) >= set(MEASURED)


def test_cost_report_counts_the_work_and_measures_each_program(dry_run):
    out, _ = dry_run
    report = _load(out, paper_scale.REPORT_FILE)
    assert report["cells"] == ["cartpole/pure"]
    assert {"backend", "device_kind", "devices", "overrides"} <= set(report["request"])
    assert set(report["basis"]) == {"memory", "flops", "seconds"}
    cost = report["envs"]["cartpole"]
    tiny = paper_scale.DRY_RUN
    stages = cost["stages"]
    assert set(stages) == {*MEASURED, "prediction_persim"}
    for name in MEASURED:
        row = stages[name]
        assert row["basis"] == "measured", name
        assert row["memory"]["total"] > 0 and row["memory"]["temp"] >= 0, name
        assert row["units"] > 0 and row["flops_per_unit"] > 0, name
        assert row["flops"] == pytest.approx(row["flops_per_unit"] * row["units"]), name
        assert row["seconds_per_unit"] > 0, name
        assert row["expected_seconds"] == pytest.approx(row["seconds_per_unit"] * row["units"])
    train = stages["train_persim"]["work"]
    assert train["transitions"] == tiny["num_agents"] * 200          # CartPole's 200 steps
    assert stages["train_persim"]["units"] == tiny["trials"] * tiny["epochs"] * train[
        "steps_per_epoch"]
    reward = stages["reward_persim"]["work"]
    assert reward["plans"] == tiny["trials"] * 5 * tiny["episodes"] * tiny["max_steps"]
    # Random shooting of 8 candidates, horizon 3: 24 model evaluations per plan.
    assert reward["model_evaluations_per_plan"] == tiny["candidates"] * tiny["horizon"]
    assert stages["prediction_persim"]["expected_seconds"] is None
    assert stages["prediction_persim"]["basis"].startswith("not estimated")
    assert cost["expected_seconds_per_cell"] == pytest.approx(
        sum(stages[name]["expected_seconds"] for name in MEASURED))
    assert cost["peak_memory_bytes"] == max(stages[n]["memory"]["total"] for n in MEASURED)
    text = paper_scale.format_report(report)
    assert "| train_persim |" in text and "Expected in all (1 cells)" in text


def test_rerun_reuses_the_cost_report_and_skips_the_recorded_cell(dry_run, capsys):
    out, _ = dry_run
    capsys.readouterr()
    code = paper_scale.run(["cartpole"], ["pure"], ["persim"], out, os.path.join(out, "data"),
                           os.path.join(out, "record"), dict(paper_scale.DRY_RUN))
    printed = capsys.readouterr().out
    assert code == 0
    assert "reusing the cost report" in printed
    assert "cartpole / pure: recorded, skipped" in printed


def test_borrowed_stages_keep_the_rate_and_scale_the_work():
    row = paper_scale.stage_row(work={}, units=10, unit="step", memory={"total": 5},
                                flops_per_unit=2.0, seconds_per_unit=0.5, program="p")
    other = paper_scale.borrowed(row, {"transitions": 3}, 4, "train_persim")
    assert other["flops"] == 8.0 and other["expected_seconds"] == 2.0
    assert other["basis"] == "rate of train_persim (same network)"


def test_bad_requests_are_refused_before_any_output(tmp_path, capsys):
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="--envs: unknown pendulum"):
        paper_scale.run(["pendulum"], ["pure"], ["all"], out, out, out)
    with pytest.raises(UserError, match="--datasets: unknown purest"):
        paper_scale.run(["cartpole"], ["purest"], ["all"], out, out, out)
    with pytest.raises(UserError, match="--methods: unknown magic"):
        paper_scale.run(["cartpole"], ["pure"], ["magic"], out, out, out)
    assert not os.path.exists(out)
    # The command's exit: one line naming the problem, code 2.
    code = cli.exit_on_user_error(lambda: paper_scale.run(["pendulum"], ["pure"], ["all"], out,
                                                          out, out))
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --envs: unknown pendulum; valid: mountaincar, cartpole, halfcheetah"]
