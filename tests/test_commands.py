"""Every `python -m experiments.*` command runs to its end at a tiny size, as
a user runs it (a subprocess, the flags parsed by absl), and writes what it
says it writes. (A landed command once computed for ten minutes and then died
on a helper that another change had removed: only running it to the end finds
that.) The investigation scripts have their own tests
(tests/test_diagnostics.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The run config's flags at a tiny size (experiments.run and experiments.new_agents).
TINY = ["--num_agents=8", "--trials=1", "--ensemble_size=2", "--epochs=2", "--state_hidden=32",
        "--episodes=1", "--max_steps=10", "--prediction_episodes=2", "--candidates=16",
        "--horizon=5"]


def command(module: str, *args, timeout: int = 400) -> subprocess.CompletedProcess:
    """Runs `python -m experiments.<module> args` in the repository, one JAX
    CPU device; fails the test with the command's stderr tail if it fails."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    result = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    assert result.returncode == 0, f"{module} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One dataset cache for every command of this module."""
    return str(tmp_path_factory.mktemp("data"))


def test_new_agents_then_run_reuses_its_simulator(tmp_path, data_dir):
    out = tmp_path / "out"
    result = command("new_agents", "--env=mountaincar", "--dataset=random",
                     "--num_new_agents=2", "--mpc_agents=1", f"--out_dir={out}",
                     f"--data_dir={data_dir}", *TINY)
    directory = out / "mountaincar" / "random"
    results = json.loads((directory / "new_agents.json").read_text())
    assert results["num_new_agents"] == 2 and len(results["rmse_new"]) == 6
    assert results["reward"]["agents"] == 1
    assert (directory / "new_agents.png").read_bytes()[:4] == b"\x89PNG"
    assert "New agents without retraining" in (directory / "new_agents.md").read_text()
    assert "rmse_new" in result.stdout

    # experiments.run gives PerSim the same training key: it reuses the simulator.
    result = command("run", "--env=mountaincar", "--dataset=random", f"--out_dir={out}",
                     f"--data_dir={data_dir}", "--skip=plots", "--notrue_env_mpc", "--methods=persim",
                     *TINY)
    results = json.loads((directory / "results.json").read_text())
    assert results["env"] == "mountaincar" and len(results["prediction"]["rmse"]) == 5
    assert "[train] trial 0: reusing" in result.stderr
    assert "PerSim" in result.stdout          # the report is printed


def test_make_dataset(tmp_path):
    command("make_dataset", "--env=cartpole", "--dataset=random", "--num_agents=6",
            f"--data_dir={tmp_path}")
    assert os.path.exists(tmp_path / "cartpole_random_seed0_n6.npz"), os.listdir(tmp_path)


def test_sweep(tmp_path, data_dir):
    extra = " ".join([f"--data_dir={data_dir}", "--skip=plots,reward", *TINY])
    command("sweep", "--env=mountaincar", "--datasets=random", "--ranks=2",
            f"--out_dir={tmp_path}", f"--extra={extra}")
    tables = [name for name in os.listdir(tmp_path) if name.endswith(".md")]
    assert tables, os.listdir(tmp_path)


def test_demo():
    result = command("demo", "--envs=cartpole", "--agents=5")
    assert "cartpole" in (result.stdout + result.stderr).lower()


def test_train_policies(tmp_path):
    command("train_policies", "--env=cartpole", "--num_timesteps=200", "--final_episodes=1",
            '--config={"eval_every": 100, "eval_episodes": 1}', f"--out_dir={tmp_path}",
            f"--state_path={tmp_path / 'state.msgpack'}")
    written = os.listdir(tmp_path)
    assert any(name.endswith(".msgpack") for name in written), written
