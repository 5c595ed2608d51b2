"""Every `python -m experiments.diagnostics.*` investigation runs to its end at
a tiny size, as a user runs it (a subprocess, the flags parsed by absl), and
writes its JSON where it says: under runs/diagnostics/ by default (never into
the committed record), wherever `--out` names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import diagnostics
from experiments.datagen import datasets
from persim_jax.methods import cadm
from persim_jax.persim import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def diagnostic(name: str, *args, cwd: str = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -m experiments.diagnostics.<name> args` (one JAX CPU
    device) from `cwd`; fails the test with the command's stderr tail when it
    fails."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", f"experiments.diagnostics.{name}", *args],
                            capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One dataset cache for every diagnostic of this module."""
    return str(tmp_path_factory.mktemp("data"))


def test_output_goes_under_runs_unless_told_to_write_into_the_record():
    assert diagnostics.output_path("x.json", "mountaincar", "random") == os.path.join(
        "runs", "diagnostics", "quick", "mountaincar", "random", "x.json")
    recorded = diagnostics.output_path("x.json", "cartpole", "pure", record=True, preset="paper")
    assert recorded == os.path.join(ROOT, "experiments", "results", "paper", "cartpole", "pure",
                                    "x.json")
    assert diagnostics.output_path("x.json", "cartpole", "pure", out="here.json",
                                   record=True) == "here.json"


def test_prediction_coverage(tmp_path, data_dir):
    # Run from a scratch folder: the default output lands under its runs/diagnostics/.
    diagnostic("prediction_coverage", "--env=mountaincar", "--dataset=random", "--episodes=1",
               "--num_agents=8", f"--data_dir={data_dir}", cwd=str(tmp_path))
    path = tmp_path / "runs" / "diagnostics" / "quick" / "mountaincar" / "random"
    result = json.loads((path / "prediction_coverage.json").read_text())
    assert result["episodes"] == 1 and len(result["agents"]) == 5
    assert all(0.0 <= row["inside_fraction"] <= 1.0 for row in result["agents"])


def test_mountaincar_wall(tmp_path, data_dir):
    transitions, _ = datasets.load_or_generate("mountaincar", "random", data_dir=data_dir,
                                               num_agents=8)
    simulator = train.fit(transitions, rank=2, key=jax.random.PRNGKey(0), ensemble_size=1,
                          epochs=1, state_hidden=(16,), progress=False)
    simulator.save(tmp_path / "simulator.msgpack")
    out = tmp_path / "wall.json"
    result = diagnostic("mountaincar_wall", "--dataset=random", "--episodes=1", "--num_agents=8",
                        f"--data_dir={data_dir}", f"--simulator={tmp_path / 'simulator.msgpack'}",
                        f"--out={out}")
    written = json.loads(out.read_text())
    assert written["logged_transitions"] == transitions.num_transitions
    assert len(written["agents"]) == 5 and all(row["windows"] == 1 for row in written["agents"])
    assert "reach the wall" in result.stdout


def test_cadm_context_probe(tmp_path, data_dir):
    # CartPole / random: short episodes, so 105 agents are a few thousand rows. The probe
    # reads a saved model's encoder, trained or not: an initialised one keeps this test short.
    transitions, _ = datasets.load_or_generate("cartpole", "random", data_dir=data_dir,
                                               num_agents=105)
    config = cadm.CaDMConfig(hidden=(16,), encoder_hidden=(16,))
    model = cadm.CaDMModel(
        params=cadm.init_params(jax.random.PRNGKey(0), config, transitions.obs_dim,
                                transitions.num_actions),
        stats=cadm.compute_stats(cadm.pair_data(transitions, config), transitions.discrete),
        validation_loss=jnp.zeros(config.ensemble_size), config=config,
        obs_dim=transitions.obs_dim, num_actions=transitions.num_actions)
    run_dir = tmp_path / "run"
    (run_dir / "cartpole" / "random").mkdir(parents=True)
    model.save(run_dir / "cartpole" / "random" / "vanilla_cadm_trial0.msgpack")
    out = tmp_path / "probe.json"
    diagnostic("cadm_context_probe", "--env=cartpole", "--dataset=random", "--num_agents=105",
               f"--run_dir={run_dir}", f"--data_dir={data_dir}", f"--out={out}")
    result = json.loads(out.read_text())
    assert 2 <= result["probe_agents"] <= 5 and result["held_out_agents"] <= 95
    assert set(result["r2"]) == {"force", "length"}


def test_bcq_bootstrap(tmp_path, data_dir):
    out = tmp_path / "bcq.json"
    diagnostic("bcq_bootstrap", "--iterations=2", "--episodes=1", "--num_agents=8",
               f"--data_dir={data_dir}", f"--out={out}")
    result = json.loads(out.read_text())
    assert result["iterations"] == 2 and len(result["test_agents"]) == 5
    for variant in ("not_done (ours)", "done (PerSim's copy)"):
        assert len(result[variant]["mean"]) == 5
