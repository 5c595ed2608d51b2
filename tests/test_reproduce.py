"""The reproduction record (`experiments.reproduce`): which cells count as
done, the claims checked on a cell's numbers, departures from the paper, and
REPORT.md from recorded cells."""

from __future__ import annotations

import json

from experiments import reproduce


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
    checks = {claim: check(results) for claim, check in reproduce.CLAIMS}
    assert checks["PerSim predicts better than Vanilla CaDM"] is True
    assert checks["PerSim earns more than Vanilla CaDM"] is True
    assert checks["PerSim earns more than BCQ-P"] is False
    assert checks["PerSim is within True env + MPC's spread"] is True       # -120 >= -119.5 - 1
    assert checks["PerSim predicts better than PE-TS CaDM"] is None         # not run
    assert reproduce.is_done(results, "quick", ["persim", "bcq_p"])
    assert not reproduce.is_done(results, "quick", ["all"])
    assert not reproduce.is_done(results, "paper", ["persim"])


def test_departures_name_agents_and_known_causes():
    results = _results(0.01, -120.0, bcq_p=(None, -100.0))
    lines = reproduce.departures(results)
    # PerSim's RMSE 0.01 against the paper's 0.001; BCQ-P's -100 against -500 ± 0.
    assert any(line.startswith("PerSim, prediction RMSE") for line in lines)
    bcq = [line for line in lines if line.startswith("BCQ-P, reward")]
    assert bcq and "(gravity=0.0001) -100.0 vs -500" in bcq[0] and "bootstraps on `done`" in bcq[0]


def test_report_from_the_record(tmp_path):
    cell = tmp_path / "quick" / "mountaincar" / "random"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(json.dumps(
        _results(0.01, -120.0, vanilla_cadm=(0.5, -300.0))))
    path = reproduce.write_report(str(tmp_path), "quick")
    text = open(path, encoding="utf-8").read()
    assert "1 of 12 env × dataset cells recorded" in text
    assert "| PerSim predicts better than Vanilla CaDM | yes | 1 / 1 |" in text
    assert "## MountainCar / Random" in text and "Vanilla CaDM (paper)" in text
