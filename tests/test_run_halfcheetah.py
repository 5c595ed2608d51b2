"""HalfCheetah end to end on a tiny configuration: its own file, so that the
test runners schedule its MJX compilations apart from the other run tests
(`--dist loadfile` keeps a file on one worker)."""

from __future__ import annotations

from experiments.config import resolve
from experiments.pipeline import run_pipeline
from test_run import TINY, check_results


def test_halfcheetah_end_to_end(tmp_path):
    out_dir, data_dir = str(tmp_path / "out"), str(tmp_path / "data")
    # PerSim alone: each further method adds its own MJX episode and
    # prediction programs, minutes of compiling on 2 cores. The baselines run
    # end to end on CartPole in test_run.py, and on continuous actions in
    # test_cadm.py and test_bcq.py.
    settings = resolve("halfcheetah", "random", "quick",
                       dict(TINY, num_agents=8, candidates=8, horizon=3, cem_rounds=1,
                            cem_elites=3, max_steps=4,
                            methods=("persim",), true_env_mpc=False))
    # True env + MPC on MuJoCo's C simulator: tests/test_true_env_mujoco.py.
    # The figures are the CartPole test's (their code does not depend on the env).
    results = run_pipeline("halfcheetah", "random", settings, preset="quick", seed=0,
                               out_dir=out_dir, data_dir=data_dir, skip=("plots",))
    stored = check_results(results, out_dir, "halfcheetah", "random", figures=False)
    assert stored["reward"]["true_env_mpc"] is None
    assert stored["config"]["planner"]["kind"] == "CEMConfig"
    assert set(stored["methods"]) == {"persim"}, stored["methods"]
