"""Does a seed give one dataset wherever it runs? The same generation request
under different numbers of JAX CPU devices and different numbers of agents,
compared on the test agents (units 0..4), whose covariates and keys do not
depend on either.

    python -m benchmarks.dataset_reproducibility --env=halfcheetah --dataset=random \\
        --num_agents=10,20,100 --devices=1,2

Each (devices, num_agents) generation runs in its own process (the device
count is fixed at JAX's start) and appends one JSON line to `--out`: the test
agents' logged returns, a checksum of their transitions, the library versions
the seconds and the host CPU (`datasets.host_cpu`). Lines already in `--out` for
the same request on the same kind of CPU are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from experiments.datagen import datasets

_ENV = flags.DEFINE_string("env", "halfcheetah", "Environment.")
_DATASET = flags.DEFINE_string("dataset", "random", "Paper dataset.")
_AGENTS = flags.DEFINE_list("num_agents", ["10", "20", "100"], "Numbers of agents.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "JAX CPU device counts.")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed.")
_OUT = flags.DEFINE_string("out", os.path.join("benchmarks", "results",
                                               "dataset_reproducibility.jsonl"), "JSON lines.")

# The child: generate, then describe the test agents' part.
CHILD = """
import hashlib, json, sys, time
import numpy as np
from experiments.datagen import datasets
env, dataset, seed, num_agents = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.time()
transitions, metadata = datasets.generate(env, dataset, seed=seed, num_agents=num_agents)
test = np.asarray(transitions.agent_id) < 5
digest = hashlib.sha256()
for field in (transitions.obs, transitions.action, transitions.next_obs):
    digest.update(np.ascontiguousarray(np.asarray(field)[test]).tobytes())
import jax
print(json.dumps({"test_agent_return": metadata["stats"]["test_agent_return"],
                  "test_agents_sha256": digest.hexdigest(), "devices": jax.device_count(),
                  "libraries": metadata["libraries"], "seconds": round(time.time() - start, 1)}))
"""


def main(argv):
    del argv
    cpu = datasets.host_cpu()
    done = set()
    if os.path.exists(_OUT.value):
        with open(_OUT.value) as handle:
            for line in handle:
                row = json.loads(line)
                done.add((row["env"], row["dataset"], row["seed"], row["num_agents"],
                          row["requested_devices"], row.get("cpu")))
    for devices in map(int, _DEVICES.value):
        for num_agents in map(int, _AGENTS.value):
            request = (_ENV.value, _DATASET.value, _SEED.value, num_agents, devices, cpu)
            if request in done:
                continue
            environ = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
            output = subprocess.run(
                [sys.executable, "-c", CHILD, _ENV.value, _DATASET.value, str(_SEED.value),
                 str(num_agents)], capture_output=True, text=True, env=environ, check=True)
            row = {"bench": "dataset_reproducibility", "env": _ENV.value,
                   "dataset": _DATASET.value, "seed": _SEED.value, "num_agents": num_agents,
                   "requested_devices": devices, "cpu": cpu,
                   **json.loads(output.stdout.strip().splitlines()[-1])}
            with open(_OUT.value, "a") as handle:      # one whole line per request
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
