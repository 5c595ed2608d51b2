"""The pipeline's caches trust nothing they cannot read: every kind of file a
run caches (the generated dataset and its sidecar, the stage records, each
kind of trained model), truncated, is rebuilt on the next run with one warning
line naming it, never a traceback, and the rebuilt run gives the same numbers.
(Damaged training checkpoints: tests/test_train.py; a damaged per-agent file:
tests/test_methods.py.)"""

from __future__ import annotations

import logging
import os

import pytest

from experiments.config import resolve
from experiments.datagen import datasets
from experiments.pipeline import run_pipeline

TINY = dict(trials=1, num_agents=8, ensemble_size=2, epochs=2, state_hidden=(32,), episodes=1,
            max_steps=10, prediction_episodes=2, candidates=16, horizon=5,
            methods=["persim", "vanilla_cadm", "bcq_p"], bcq_iterations=20,
            cadm_iterations=1, cadm_pairs_per_epoch=100)


def truncate(path: str) -> None:
    """Keeps the first half of the file (a write cut short)."""
    with open(path, "rb") as handle:
        content = handle.read()
    with open(path, "wb") as handle:
        handle.write(content[:len(content) // 2])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """(results, out_dir, data_dir) of a tiny CartPole run."""
    out_dir = str(tmp_path_factory.mktemp("out"))
    data_dir = str(tmp_path_factory.mktemp("data"))
    config = resolve("cartpole", "random", "quick", TINY)
    results = run_pipeline("cartpole", "random", config, preset="quick", seed=0, out_dir=out_dir,
                           data_dir=data_dir, skip=("reward", "plots"))
    return results, out_dir, data_dir, config


def rerun_with_damaged(first_run, damaged, caplog) -> dict:
    """Truncates each of `damaged`, re-runs, and checks the warnings; the
    re-run's results."""
    _, out_dir, data_dir, config = first_run
    for path in damaged:
        assert os.path.exists(path), path
        truncate(path)
    caplog.clear()
    caplog.set_level(logging.WARNING)
    again = run_pipeline("cartpole", "random", config, preset="quick", seed=0, out_dir=out_dir,
                         data_dir=data_dir, skip=("reward", "plots"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for path in damaged:
        if path.endswith(".json") and "stages" not in path:
            continue     # the dataset's sidecar: the dataset is regenerated, named by its .npz
        assert any(path in line and "damaged" in line for line in warnings), (path, warnings)
    assert all("\n" not in line for line in warnings)
    for path in damaged:
        with open(path, "rb") as handle:
            assert len(handle.read()) > 0
    return again


def test_every_damaged_cache_file_is_rebuilt_with_a_warning(first_run, caplog):
    results, out_dir, data_dir, _ = first_run
    run_dir = os.path.join(out_dir, "cartpole", "random")
    dataset = datasets.dataset_path("cartpole", "random", data_dir=data_dir, num_agents=8)
    # A damaged stage record redoes its stage; a damaged model file retrains
    # its method (first with intact records, then PerSim's with its record).
    first = [dataset, datasets.metadata_path(dataset),
             os.path.join(run_dir, "stages", "train_persim_trial0.json"),
             os.path.join(run_dir, "stages", "prediction_persim.json"),
             os.path.join(run_dir, "vanilla_cadm_trial0.msgpack"),
             os.path.join(run_dir, "bcq_p_trial0.msgpack")]
    second = [os.path.join(run_dir, "simulator_trial0.msgpack")]
    for damaged in (first, second):
        again = rerun_with_damaged(first_run, damaged, caplog)
        # Rebuilt from nothing, the numbers are the first run's.
        for name in ("persim", "vanilla_cadm"):
            assert again["methods"][name]["prediction"] == results["methods"][name]["prediction"]
