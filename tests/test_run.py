"""End-to-end tests of the experiments CLI on tiny configurations (few agents,
epochs, candidates and steps): every stage runs, `results.json` has the
documented keys, figures exist, re-runs skip finished stages, and bad input
exits non-zero with one clear line and no output written."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import envs
from experiments import paper, run
from experiments.config import UserError, resolve
from persim_jax.methods import REGISTRY as METHODS
from experiments.pipeline import run_pipeline
from persim_jax import data, planning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The baselines too: the quick preset's BCQ (5e4 steps) and CaDM fits are real
# training, minutes on 2 cores; here they only need to run.
TINY = dict(trials=1, num_agents=8, ensemble_size=2, epochs=2, state_hidden=(32,), episodes=1,
            max_steps=12, prediction_episodes=2, candidates=16, horizon=5, policy_episodes=1,
            bcq_iterations=100, cadm_iterations=1, cadm_pairs_per_epoch=1000)


def check_results(results, out_dir, env, dataset, figures=True):
    directory = os.path.join(out_dir, env, dataset)
    with open(os.path.join(directory, "results.json")) as handle:
        stored = json.load(handle)
    for key in ("env", "dataset", "preset", "seed", "test_agents", "prediction", "reward",
                "dataset_stats", "timing_s"):
        assert key in stored, key
    assert stored["env"] == env and stored["dataset"] == dataset
    assert len(stored["test_agents"]) == 5
    prediction = stored["prediction"]
    assert len(prediction["rmse"]) == 5 and len(prediction["r2_median"]) == 5
    assert prediction["horizon"] == 50 and prediction["trials"] == 1
    assert np.all(np.isfinite(prediction["rmse"]))
    per_episode = np.asarray([[[np.nan if x is None else x for x in agent] for agent in trial]
                              for trial in prediction["rmse_episodes"]])  # (trials, K, E)
    assert per_episode.shape[:2] == (1, 5)
    np.testing.assert_allclose(np.nanmean(per_episode, axis=(0, 2)), prediction["rmse"], rtol=1e-5)
    reward = stored["reward"]
    assert len(reward["persim"]["mean"]) == 5 and len(reward["persim"]["std"]) == 5
    assert reward["episodes"] == 1 and reward["trials"] == 1
    stats = stored["dataset_stats"]
    assert len(stats["test_agent_return"]) == 5 and np.isfinite(stats["mean_length"])
    with np.load(os.path.join(directory, "agent_factors.npz")) as factors:
        assert factors["factors"].shape[:2] == (2, 8)
        assert factors["covariates"].shape[0] == 8
    assert bool(stored["figures"]) == figures, stored["figures"]
    for name in stored["figures"]:
        with open(os.path.join(directory, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", name
    with open(os.path.join(directory, "report.md")) as handle:
        report_text = handle.read()
    assert "PerSim" in report_text
    assert stored == json.loads(json.dumps(data.jsonable(results)))
    return stored


def test_cartpole_end_to_end_and_rerun_skips(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out_dir, data_dir = str(tmp_path / "out"), str(tmp_path / "data")
    settings = resolve("cartpole", "pure", "quick", TINY)
    results = run_pipeline("cartpole", "pure", settings, preset="quick", seed=0,
                               out_dir=out_dir, data_dir=data_dir)
    stored = check_results(results, out_dir, "cartpole", "pure")
    assert stored["reward"]["true_env_mpc"] is not None
    assert len(stored["reward"]["true_env_mpc"]["mean"]) == 5
    # Returns are CartPole's: one per step survived, at most max_steps.
    returns = np.asarray(stored["reward"]["persim"]["returns"])
    assert np.all((returns >= 1) & (returns <= 12))
    caplog.clear()

    again = run_pipeline("cartpole", "pure", settings, preset="quick", seed=0,
                             out_dir=out_dir, data_dir=data_dir)
    printed = caplog.text
    caplog.clear()
    assert "reusing" in printed and "[train] trial 0: reusing" in printed
    assert again["prediction"] == results["prediction"]
    assert again["reward"] == results["reward"]

    # A changed planner setting redoes the reward stage only.
    changed = resolve("cartpole", "pure", "quick", dict(TINY, candidates=8))
    third = run_pipeline("cartpole", "pure", changed, preset="quick", seed=0,
                             out_dir=out_dir, data_dir=data_dir)
    printed = caplog.text
    assert "[train] trial 0: reusing" in printed and "[prediction] reusing" in printed
    assert "[reward] reusing" not in printed
    assert third["config"]["planner"]["num_candidates"] == 8

    # A method's numbers do not depend on which other methods ran beside it:
    # PerSim alone, everything recomputed, gives the same rows.
    alone = resolve("cartpole", "pure", "quick", dict(TINY, true_env_mpc=False))
    fourth = run_pipeline("cartpole", "pure", alone, preset="quick", seed=0,
                              out_dir=str(tmp_path / "alone"), data_dir=data_dir, force=True)
    assert fourth["config"]["methods"] == ["persim"]
    for section in ("prediction", "reward"):
        assert fourth["methods"]["persim"][section] == results["methods"]["persim"][section]
    assert fourth["reward"]["persim"] == results["reward"]["persim"]

    # Adding a method to a finished run trains and evaluates only that method.
    caplog.clear()
    more = resolve("cartpole", "pure", "quick",
                                dict(TINY, candidates=8,       # the third run's settings
                                     methods=["persim", "true_env_mpc", "population"]))
    fifth = run_pipeline("cartpole", "pure", more, preset="quick", seed=0,
                             out_dir=out_dir, data_dir=data_dir)
    printed = caplog.text
    assert "[train] trial 0: reusing" in printed and "[train] trial 0: population" in printed
    assert printed.count("[reward] reusing") == 2 and "[prediction] reusing" in printed
    assert fifth["methods"]["persim"]["prediction"] == results["methods"]["persim"]["prediction"]
    population = fifth["methods"]["population"]
    assert len(population["prediction"]["rmse"]) == 5 and len(population["reward"]["mean"]) == 5
    assert population["train_seconds"] > 0
    with open(os.path.join(out_dir, "cartpole", "pure", "report.md")) as handle:
        assert "Population model (ours)" in handle.read()

    # Where the dataset lies is in no key: a moved data folder reuses every stage.
    caplog.clear()
    moved = str(tmp_path / "moved")
    shutil.copytree(data_dir, moved)
    sixth = run_pipeline("cartpole", "pure", more, preset="quick", seed=0,
                             out_dir=out_dir, data_dir=moved)
    printed = caplog.text
    assert printed.count("[train] trial 0: reusing") == 2 and ": persim, " not in printed
    assert printed.count("[reward] reusing") == 3
    assert sixth["methods"] == fifth["methods"]


def test_user_data_trains_and_reports_validation(tmp_path):
    rng = np.random.default_rng(0)
    num_agents, steps = 6, 30
    obs = rng.normal(size=(num_agents * steps, 2)).astype(np.float32)
    action = rng.integers(0, 3, size=num_agents * steps)
    agent = np.repeat(np.arange(num_agents), steps)
    gain = np.linspace(0.5, 1.5, num_agents)[agent][:, None]
    next_obs = obs + 0.1 * gain * (action[:, None] - 1)
    transitions = data.make_transitions(obs, action, next_obs, agent, num_actions=3)
    path = str(tmp_path / "mine.npz")
    data.save_npz(path, transitions)
    out_dir = str(tmp_path / "out")
    settings = resolve(None, path, "quick", dict(epochs=3, ensemble_size=2,
                                                             state_hidden=(16,)))
    results = run_pipeline(None, path, settings, preset="quick", seed=0, out_dir=out_dir,
                               data_dir=str(tmp_path / "data"))
    directory = os.path.join(out_dir, "custom", "mine")
    assert results["prediction"] is None and results["reward"] is None
    per_agent = results["validation"]["per_agent"]
    assert sorted(per_agent) == [str(n) for n in range(num_agents)]   # the file's own ids
    for n in range(num_agents):
        entry = per_agent[str(n)]
        # Each agent's last 20 % (6 of 30 steps) is held out; "no change"
        # predicts s_t, so its one-step RMSE is the RMS of the held-out Δs.
        rows = np.flatnonzero(agent == n)[-6:]
        expected = np.sqrt(np.mean((next_obs[rows] - obs[rows]) ** 2, axis=0))
        assert entry["held_out_transitions"] == 6
        np.testing.assert_allclose(entry["no_change"]["one_step"]["rmse"], expected, rtol=1e-5)
        for model in ("persim", "population"):
            assert all(r >= 0 for r in entry[model]["one_step"]["rmse"])
    assert os.path.exists(os.path.join(directory, "results.json"))
    # No covariates: the factors' t-SNE alone, and the report says how to add them.
    assert results["figures"] == ["tsne_factors.png"]
    with open(os.path.join(directory, "report.md")) as handle:
        text = handle.read()
    assert "(tsne_factors.png)" in text and "named `cov_<name>`" in text
    assert "Does personalisation help?" in text and "num_agents" not in text
    with np.load(os.path.join(directory, "agent_factors.npz")) as factors:
        assert factors["factors"].shape[:2] == (2, num_agents)


def cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args,
                           f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--env=pendulum"], "pendulum"),
    (["--env=cartpole", "--dataset=nonexistent.npz"], "no such file: nonexistent.npz"),
    (["--env=cartpole", "--dataset=purest"], "neither one of pure"),
    (["--env=cartpole", "--preset=huge"], "huge"),
])
def test_cli_rejects_bad_input(tmp_path, args, message):
    result = cli(tmp_path, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rejects_nan_dataset_without_output(tmp_path):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(10, 4)).astype(np.float32)
    obs[3, 1] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, observations=obs, actions=np.zeros(10, np.int64),
             next_observations=obs + 1, agent_ids=np.repeat(np.arange(2), 5))
    result = cli(tmp_path, "--env=cartpole", f"--dataset={path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --dataset:"), result.stderr
    assert "bad.npz" in lines[-1] and "obs" in lines[-1] and "NaN" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_all_methods_leave_true_env_mpc_to_the_preset():
    available = tuple(METHODS)
    assert resolve("halfcheetah", "random", "quick").true_env_mpc        # every preset: on
    cheetah = resolve("halfcheetah", "random", "quick", dict(methods=["all"], true_env_mpc=False))
    assert "true_env_mpc" not in cheetah.method_names(available)        # turned off
    assert "bcq_a" in cheetah.method_names(available)
    asked = resolve("halfcheetah", "random", "quick",
                    dict(methods=["all", "true_env_mpc"], true_env_mpc=False))
    assert "true_env_mpc" in asked.method_names(available)
    cartpole = resolve("cartpole", "pure", "quick", dict(methods=["all"]))
    assert cartpole.method_names(available) == available


def test_settings_follow_the_envs_normalisation_and_schedule():
    cartpole = resolve("cartpole", "pure", "quick")
    assert cartpole.standardize is False                    # the authors' raw CartPole
    assert cartpole.lr_halving_epochs == 50 and cartpole.batch_size == 64
    assert resolve("cartpole", "pure", "paper").batch_size == 64
    assert resolve("mountaincar", "pure", "paper").batch_size == 32
    assert resolve("mountaincar", "pure", "quick").standardize is False  # raw, as the authors
    assert resolve("halfcheetah", "pure", "paper").batch_size == 256
    assert resolve("halfcheetah", "random", "paper").standardize is True
    assert resolve("mountaincar", "random", "paper").lr_halving_epochs == 150
    overridden = resolve("cartpole", "pure", "quick",
                                      dict(standardize=True, lr_halving_epochs=0))
    assert overridden.standardize is True and overridden.lr_halving_epochs is None
    with pytest.raises(UserError, match="lr_halving_epochs"):
        resolve("cartpole", "pure", "quick", dict(lr_halving_epochs=-1))


def test_planner_setting_picks_the_paper_planner_or_icem():
    cheetah, cartpole = envs.make("halfcheetah"), envs.make("cartpole")
    paper_cem = resolve("halfcheetah", "random", "paper").planner_config(cheetah)
    assert isinstance(paper_cem, planning.CEMConfig) and paper_cem.num_samples == 200
    # --planner=icem: a quarter of the paper CEM's sequences per plan.
    icem = resolve("halfcheetah", "random", "paper",
                                dict(planner="icem")).planner_config(cheetah)
    assert isinstance(icem, planning.ICEMConfig) and icem.horizon == paper_cem.horizon
    assert icem.sequences_per_plan() <= 0.25 * 200 * 6 < icem.sequences_per_plan() + 5
    # iCEM at the quick CEM's cost (50 samples × 3 rounds, horizon 10).
    quick = resolve("halfcheetah", "random", "quick",
                                 dict(planner="icem", candidates=46)).planner_config(cheetah)
    assert isinstance(quick, planning.ICEMConfig) and (quick.num_samples, quick.horizon) == (46, 10)
    assert quick.sequences_per_plan() <= 150
    assert isinstance(resolve("halfcheetah", "random", "quick").planner_config(cheetah),
                      planning.CEMConfig)
    with pytest.raises(ValueError, match="fraction"):
        paper.icem_config(cheetah, 0.0)
    with pytest.raises(UserError, match="discrete actions"):
        resolve("cartpole", "pure", "quick",
                             dict(planner="icem")).planner_config(cartpole)
    with pytest.raises(UserError, match="--planner"):
        resolve("cartpole", "pure", "quick", dict(planner="mppi"))
