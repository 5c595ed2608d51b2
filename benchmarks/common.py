"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable

import jax


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of `repeats` calls of `fn` (already compiled), blocking
    until its outputs are ready."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def simulator_path(simulator: str | None, env: str, dataset: str, data_dir: str) -> str:
    """`simulator`, or the quick run's simulator of env/dataset
    (`runs/quick/<env>/<dataset>/simulator_trial0.msgpack`), trained first
    (`experiments.run --preset=quick`, no evaluation) when missing."""
    if simulator:
        return simulator
    path = os.path.join("runs", "quick", env, dataset, "simulator_trial0.msgpack")
    if not os.path.exists(path):
        subprocess.check_call([sys.executable, "-m", "experiments.run", f"--env={env}",
                               f"--dataset={dataset}", "--preset=quick", "--out_dir=runs/quick",
                               f"--data_dir={data_dir}", "--skip=prediction,reward,plots"])
    return path
