"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import os
import platform
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
