"""Process-wide JAX runtime settings.

    import persim_jax
    persim_jax.use_cpu_cores()        # first thing, before any JAX computation

On a CPU backend JAX shows one device by default, and XLA spreads each
operation of a program over the cores (intra-op threads). The planner's
operations are small (a few hundred candidates × a 256-wide layer): split
over two cores they hardly run faster than on one (CartPole's rollouts: 7.5 ms
on two cores, 8.3 ms on one). With one JAX device per core, the planner and
`evaluation.run_episodes` give each core whole shards of work instead
(candidates of one plan, or whole episodes), with no communication inside
the rollouts: 3.5 ms for the same rollouts (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os

import jax


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        return os.cpu_count() or 1


def use_cpu_cores(num_devices: int | None = None) -> int:
    """Makes the CPU backend one JAX device per core (`jax_num_cpu_devices`).

    Call it before any JAX computation (JAX fixes the device count when its
    backends start), and before importing gymnax or `envs` (importing gymnax
    starts them). It does not change accelerator backends: on a GPU
    machine the CPU devices are only used when asked for. Idempotent.

    Args:
      num_devices: CPU devices; default one per available core, or N when
        the environment sets JAX_NUM_CPU_DEVICES=N (JAX's own setting).

    Returns:
      The number of CPU devices requested.

    Raises:
      ValueError: num_devices is not a positive integer.
      RuntimeError: JAX's backends are already initialised with another
        number of CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment
    takes precedence (N is returned, nothing is changed).
    """
    if num_devices is not None and (not isinstance(num_devices, int)
                                    or isinstance(num_devices, bool) or num_devices < 1):
        raise ValueError(f"num_devices: must be a positive integer; got {num_devices!r}")
    forced = _forced_device_count()
    if forced is not None:
        return forced
    if num_devices is None:
        if jax.config.jax_num_cpu_devices > 0:      # e.g. JAX_NUM_CPU_DEVICES=N
            return jax.config.jax_num_cpu_devices
        num_devices = available_cores()
    if jax.config.jax_num_cpu_devices == num_devices:
        return num_devices
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError as error:
        raise RuntimeError(
            f"use_cpu_cores({num_devices}): JAX's backends already started with "
            f"{len(jax.devices('cpu'))} CPU device(s); call use_cpu_cores before any JAX "
            f"computation and before importing gymnax or envs (or set "
            f"JAX_NUM_CPU_DEVICES={num_devices} in the environment)") from error
    return num_devices


def _forced_device_count() -> int | None:
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_force_host_platform_device_count="):
            return int(flag.split("=", 1)[1])
    return None
