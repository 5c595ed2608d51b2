"""persim_jax.use_cpu_cores: one JAX CPU device per core, set before JAX starts."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import persim_jax
from persim_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import persim_jax
    wanted = None if sys.argv[1] == "default" else int(sys.argv[1])
    n = persim_jax.use_cpu_cores(wanted)
    import envs, jax                        # importing gymnax starts the backends
    assert persim_jax.use_cpu_cores(wanted) == n        # idempotent once started
    print(n, jax.device_count(), persim_jax.available_cores())
""")


def run_script(argument, **environ):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", **environ)
    result = subprocess.run([sys.executable, "-c", SCRIPT, argument], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(x) for x in result.stdout.split()[-3:]]


def test_use_cpu_cores_makes_one_device_per_core_or_as_asked():
    requested, devices, cores = run_script("default")
    assert requested == devices == cores
    assert run_script("3")[:2] == [3, 3]
    # JAX's own environment setting and XLA's forced count take precedence.
    assert run_script("default", JAX_NUM_CPU_DEVICES="1")[:2] == [1, 1]
    assert run_script("3", XLA_FLAGS="--xla_force_host_platform_device_count=2")[:2] == [2, 2]


def test_use_cpu_cores_after_jax_started_names_the_problem():
    jnp.zeros(()).block_until_ready()          # the backends are running
    if jax.config.jax_num_cpu_devices > 0 or runtime._forced_device_count() is not None:
        pytest.skip("this test process fixes the CPU device count itself")
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        persim_jax.use_cpu_cores(jax.device_count() + 1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_devices"):
            persim_jax.use_cpu_cores(bad)
