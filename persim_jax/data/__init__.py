"""Offline transitions of many agents: the container, its validation, and I/O.

PerSim learns from one logged trajectory per agent. Everything the model needs
is a flat table of transitions `(obs, action, next_obs, agent_id)`; rewards and
done flags travel with it for the planner and the reports, and per-agent
covariates (the hidden physics: gravity, pole length, ...) only for evaluation
and plots, never for training.

Modules:
  * `transitions`: the `Transitions` container, `make_transitions`,
    `from_rollouts`, `validate_transitions`, `time_ordered_split`.
  * `npz`: `.npz` files with D4RL-style keys (`observations`, `actions`,
    `next_observations`, `rewards`, `terminals`, `timeouts`) plus
    `agent_ids`: `save_npz` / `load_npz`.
  * `long_format`: CSV / Parquet in long format, one row per agent and time
    step (agent id, time, state columns, action columns, optionally reward,
    done and explicit next-state columns): `load_csv` / `load_parquet`,
    `from_long_format`, `save_csv`.
  * `minari`: Minari datasets (Farama's offline-RL standard), one episode per
    stretch of an agent's trajectory, the agent's id and covariates in the
    episode's metadata: `to_minari` / `from_minari` (needs the `minari`
    extra, imported only when called).
  * `files`: generic I/O: `atomic_write`, `save_msgpack` / `load_msgpack`,
    `jsonable` / `write_json`.
  * `checks`: value checks shared by the loaders (`check_column_values`,
    `OUTLIER_FACTOR`).

Every loader validates at the edge (`validate_transitions`) and raises
`ValueError` naming the field and the row. Files are written atomically: to a
temporary file in the destination folder, then renamed over the final name, so
an interrupted save never leaves a half-written dataset behind.
"""

from persim_jax.data.checks import (
    FLOAT32_MAX,
    OUTLIER_FACTOR,
    check_column_values,
    column_scale,
)
from persim_jax.data.files import (
    atomic_write,
    decode_msgpack,
    jsonable,
    load_msgpack,
    save_msgpack,
    write_json,
)
from persim_jax.data.long_format import from_long_format, load_csv, load_parquet, save_csv
from persim_jax.data.minari import from_minari, to_minari
from persim_jax.data.npz import NPZ_FORMAT, load_npz, save_npz
from persim_jax.data.transitions import (
    Transitions,
    from_rollouts,
    make_transitions,
    time_ordered_split,
    validate_transitions,
)

__all__ = [
    "FLOAT32_MAX",
    "NPZ_FORMAT",
    "OUTLIER_FACTOR",
    "Transitions",
    "atomic_write",
    "check_column_values",
    "column_scale",
    "decode_msgpack",
    "from_long_format",
    "from_minari",
    "from_rollouts",
    "jsonable",
    "load_csv",
    "load_msgpack",
    "load_npz",
    "load_parquet",
    "make_transitions",
    "save_csv",
    "save_msgpack",
    "save_npz",
    "time_ordered_split",
    "to_minari",
    "validate_transitions",
    "write_json",
]
