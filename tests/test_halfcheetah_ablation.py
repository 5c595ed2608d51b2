"""The HalfCheetah ablation's record (`benchmarks.halfcheetah_ablation`): a
finished run's results.json becomes one row, and `--table` prints it."""

from __future__ import annotations

import numpy as np

from benchmarks import halfcheetah_ablation as ablation


def _results(aggregation: str) -> dict:
    returns = np.arange(15, dtype=np.float64).reshape(1, 5, 3)     # (trials, agents, episodes)
    planner = dict(num_samples=50, horizon=10, num_rounds=2, num_elites=10, discount=0.93,
                   aggregation=aggregation)
    return {"dataset": "random", "seed": 0,
            "config": dict(num_agents=100, epochs=30, ensemble_size=5),
            "reward": {"planner": planner, "persim": {"returns": returns.tolist()},
                       "true_env_mpc": None},
            "prediction": {"rmse": [1.0, 2.0, 3.0, 4.0, 5.0]},
            "timing_s": {"reward": 150.0}}


def test_a_row_holds_every_episode_and_the_table_prints_it():
    row = ablation.row_of("epochs30_mean", _results("mean"))
    assert row["returns"] == np.arange(15).reshape(5, 3).tolist()
    assert row["agent_means"] == [1.0, 4.0, 7.0, 10.0, 13.0] and row["mean"] == 7.0
    # samples × horizon × (rounds + 1) × members
    assert row["model_evaluations_per_plan"] == 50 * 10 * 3 * 5
    assert row["prediction_rmse"] == 3.0 and row["reward_seconds_per_episode"] == 10.0
    assert row["flags"] == ablation.VARIANTS["epochs30_mean"]
    worst_case = ablation.row_of("epochs30", _results("min"))
    lines = ablation.table([worst_case, row]).splitlines()
    assert len(lines) == 4
    assert "| 50 × 10 × 3 | 100, 30 | 7,500 |" in lines[2]
    assert "| 50 × 10 × 3, members’ mean | 100, 30 |" in lines[3]
    assert lines[3].endswith("| 7.0 | – | 10 |")
