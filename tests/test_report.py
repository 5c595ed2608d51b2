"""Rendering tests of experiments.report, experiments.paper, experiments.figures
and experiments.sweep's table. The results dicts below are hand-made fixtures
(no training runs): they test the report's layout, not PerSim."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from experiments import figures, paper, report, sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def cartpole_results() -> dict:
    """A fake results.json for cartpole / pure in run.py's layout."""
    return {
        "env": "cartpole",
        "dataset": "pure",
        "preset": "quick",
        "seed": 0,
        "test_agents": [[2.0, 0.5], [10.0, 0.5], [18.0, 0.5], [10.0, 0.85], [10.0, 0.15]],
        "covariate_names": ["force", "length"],
        "prediction": {"rmse": [0.0123, 0.0456, 0.0789, 0.0321, 0.0654],
                       "r2_median": [0.987, 0.965, 0.943, 0.921, 0.899],
                       "horizon": 50, "trials": 1},
        "reward": {"persim": {"mean": [181.25, 177.5, 170.0, 160.0, 150.0],
                              "std": [1.5, 2.5, 3.5, 4.5, 5.5]},
                   "true_env_mpc": {"mean": [199.0, 198.0, 197.0, 196.0, 195.0],
                                    "std": [0.5, 1.0, 2.0, 3.0, 4.0]},
                   "episodes": 5, "trials": 1, "std_over": "episodes", "planner": {"kind": "RandomShootingConfig"}},
        "dataset_stats": {"test_agent_return": [183.0, 200.0, 191.0, 172.0, 200.0],
                          "mean_return": 186.42, "mean_length": 186.42},
        "validation": None,
        "config": {"rank": 5, "ensemble_size": 5, "epochs": 20,
                   "planner": {"kind": "RandomShootingConfig", "candidates": 1000}},
        "figures": ["tsne_force.png", "tsne_length.png", "trajectories.png"],
        "timing_s": {"dataset": 1.5, "train": 120.25, "prediction": 10.0, "reward": 60.0,
                     "total": 195.0},
    }


@pytest.fixture
def user_results() -> dict:
    """A fake results.json for a user's own data file with no env."""
    return {
        "env": None,
        "dataset": "/data/my_logs.csv",
        "preset": "quick",
        "seed": 1,
        "test_agents": None,
        "covariate_names": None,
        "prediction": None,
        "reward": None,
        "dataset_stats": None,
        "validation": {"per_agent_rmse": [0.1, 0.2, None, 0.4], "mean_rmse": 0.2333,
                       "held_out_transitions": 321},
        "config": {"rank": 3},
        "figures": [],
        "timing_s": {"dataset": 0.5, "train": 30.0},
    }


def test_paper_rows_shape():
    rows = paper.paper_rows("cartpole", "pure")
    assert set(rows) == {"dataset_stats", "prediction", "reward", "true_env_mpc"}
    assert set(rows["prediction"]) == {"persim", "vanilla_cadm", "pe_ts_cadm"}
    assert set(rows["reward"]) == {"persim", "vanilla_cadm", "pe_ts_cadm", "bcq_p", "bcq_a"}
    assert len(rows["prediction"]["persim"]["rmse"]) == 5
    assert len(rows["true_env_mpc"]["mean"]) == 5
    assert rows["dataset_stats"]["mean_return"] == pytest.approx(187.12)
    # The copy beside the module is the project's: it must match what load_tables reads.
    with open(paper.TABLES_PATH, encoding="utf-8") as handle:
        assert json.load(handle) == paper.load_tables()
    own = paper.paper_rows("cartpole", "my_logs.csv")
    assert own == {"dataset_stats": None, "prediction": {}, "reward": {}, "true_env_mpc": None}


def test_report_has_ours_and_papers_numbers(cartpole_results):
    text = report.render_report(cartpole_results)
    tables = paper.load_tables()
    # Header and settings.
    assert "CartPole" in text and "`quick`" in text and "195.0 s" in text
    assert "rank=5" in text and "planner=RandomShootingConfig" in text
    # Our numbers.
    assert "0.012 (0.987)" in text          # prediction, agent 1
    assert "181.2 ± 1.5" in text            # PerSim reward, agent 1 (181.25 to 1 decimal)
    assert "199.0 ± 0.5" in text            # True env + MPC, agent 1
    assert "186.4" in text                  # Table 8 mean return
    # Every ± says what it is over: ours (episodes of one trial here) and the paper's.
    assert "Our ± is the std over episodes of the one trial" in text
    assert "The paper's ± is the std over its 5 trials." in text
    # The paper's numbers for cartpole / pure, formatted as the report prints them.
    persim_pred = tables["prediction"]["cartpole"]["pure"]["persim"]
    assert f"{persim_pred['rmse'][4]:.3f} ({persim_pred['r2_median'][4]:.3f})" in text
    vanilla = tables["prediction"]["cartpole"]["pure"]["vanilla_cadm"]
    assert f"{vanilla['rmse'][2]:.3f} ({vanilla['r2_median'][2]:.3f})" in text
    bcq_p = tables["reward"]["cartpole"]["pure"]["bcq_p"]
    assert f"{bcq_p['mean'][0]:g} ± {bcq_p['std'][0]:g}" in text   # 166.2 ± 39.3
    true_env = tables["reward"]["true_env_mpc"]["cartpole"]
    assert f"{true_env['mean'][2]:g} ± {true_env['std'][2]:g}" in text  # 194.8 ± 14.2
    assert "187.12" in text                 # paper Table 8 mean return
    # Rows, columns, how-to-read, timing.
    for label in ("PerSim (ours)", "True env + MPC (ours)", "PerSim (paper)",
                  "Vanilla CaDM (paper)", "PE-TS CaDM (paper)", "BCQ-A (paper)",
                  "True env + MPC (paper)"):
        assert label in text
    assert "force=18, length=0.5" in text
    assert "How to read" in text and "quick" in text
    assert "| train | 120.2 |" in text or "| train | 120.3 |" in text
    # Figures listed in results are linked when no folder is given.
    assert "(tsne_force.png)" in text and "(trajectories.png)" in text


def test_report_handles_missing_sections(cartpole_results):
    results = copy.deepcopy(cartpole_results)
    results["prediction"] = None
    del results["reward"]
    del results["dataset_stats"]
    results["timing_s"] = {}
    text = report.render_report(results)
    assert "Skipped: prediction error was not measured" in text
    assert "Skipped: rewards were not measured" in text
    # The paper's rows are still there to compare against.
    assert "Vanilla CaDM (paper)" in text and "BCQ-P (paper)" in text
    assert "PerSim (ours)" not in text
    with pytest.raises(ValueError, match="dataset"):
        report.render_report({"env": "cartpole"})


def test_user_data_report(user_results, tmp_path):
    path = tmp_path / "report.md"
    assert report.write_report(user_results, path) == str(path)
    text = path.read_text(encoding="utf-8")
    assert "my_logs.csv" in text and "own data" in text
    assert "Validation" in text and "over 3 agents" in text
    assert "| 0.2333 | 0.2000 | 0.1000 | 0.4000 |" in text
    assert "held_out_transitions: 321" in text
    assert "(paper)" not in text
    assert "Figures" not in text
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_write_report_links_only_existing_figures(cartpole_results, tmp_path):
    (tmp_path / "tsne_force.png").write_bytes(PNG_MAGIC)
    report.write_report(cartpole_results, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "(tsne_force.png)" in text
    assert "tsne_length.png" not in text and "trajectories.png" not in text


def test_plot_tsne_writes_pngs(tmp_path):
    rng = np.random.default_rng(0)
    covariates = rng.uniform(size=(40, 2))
    factors = np.concatenate([covariates, 0.1 * rng.normal(size=(40, 3))], axis=1)
    paths = figures.plot_tsne(factors, covariates, ["force", "length"],
                              str(tmp_path / "tsne"), highlight=range(5))
    assert paths == [str(tmp_path / "tsne_force.png"), str(tmp_path / "tsne_length.png")]
    for path in paths:
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG_MAGIC
    # Per-member factors (M, N, r) are accepted too; a mismatch is named.
    with pytest.raises(ValueError, match="names"):
        figures.plot_tsne(factors[None], covariates, ["force"], str(tmp_path / "x"))


def test_plot_trajectories_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    true = rng.normal(size=(2, 30, 8)).cumsum(axis=1)
    predicted = true + 0.1
    valid = np.ones((2, 30), bool)
    valid[1, 20:] = False
    members = predicted[:, None] + 0.05 * rng.normal(size=(2, 3, 30, 8))
    path = figures.plot_trajectories(true, predicted, valid, tmp_path / "trajectories.png",
                                     ["mass 0.3, damping 1.7", "mass 1.7, damping 0.3"],
                                     members=members, dims=[0, 3, 7])
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC
    with pytest.raises(ValueError, match="dims"):
        figures.plot_trajectories(true, predicted, valid, tmp_path / "t.png", ["a", "b"],
                                  dims=[8])


def test_sweep_table_one_row_per_config(cartpole_results):
    other = copy.deepcopy(cartpole_results)
    other["prediction"] = None
    table = sweep.sweep_table([("pure, rank 3", cartpole_results), ("pure, rank 5", other)])
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 2
    assert lines[2].startswith("| pure, rank 3 |")
    assert "0.0469" in lines[2]             # mean RMSE over the 5 agents
    assert "167.8" in lines[2]              # mean PerSim reward
    assert "197.0" in lines[2] and "195" in lines[2]
    assert lines[3].startswith("| pure, rank 5 | – | – |")
    assert sweep.results_path("runs/s", "cartpole", "/x/logs.csv", 3) == os.path.join(
        "runs/s", "rank3", "cartpole", "logs", "results.json")
