"""Investigations behind the reproduction record's notes (as mbrl-lib keeps
`diagnostics/`): each measures one cause of a departure from the paper.

    python -m experiments.diagnostics.mountaincar_wall --dataset=random
    python -m experiments.diagnostics.prediction_coverage --env=mountaincar --dataset=pure
    python -m experiments.diagnostics.cadm_context_probe --env=mountaincar --dataset=random
    python -m experiments.diagnostics.bcq_bootstrap

Each writes one JSON under `runs/diagnostics/<preset>/<env>/<dataset>/` by
default; `--record` writes it beside the record's cell instead
(`experiments/results/<preset>/<env>/<dataset>/`, where the notes of
`experiments/results/notes.json` cite it), `--out=FILE` anywhere.
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments.reproduce import RECORD_DIR, cell_dir
from persim_jax.data import atomic_write

DIAGNOSTICS_DIR = os.path.join("runs", "diagnostics")


def define_output_flags() -> None:
    """`--out` and `--record`, the flags every diagnostic shares."""
    flags.DEFINE_string("out", None, "JSON output (default: under runs/diagnostics/, or beside "
                        "the record's cell with --record).")
    flags.DEFINE_bool("record", False, "Write the JSON beside the record's cell "
                      "(experiments/results/<preset>/<env>/<dataset>/), where its notes cite it.")


def output_path(name: str, env: str, dataset: str, *, out: str | None = None,
                record: bool = False, preset: str = "quick") -> str:
    """Where a diagnostic's JSON `name` goes: `out` when given, else beside the
    record's `preset` / `env` / `dataset` cell when `record`, else the same
    place under `runs/diagnostics/`."""
    if out:
        return out
    return os.path.join(cell_dir(RECORD_DIR if record else DIAGNOSTICS_DIR, preset, env, dataset),
                        name)


def write_json(path: str, result: dict, *, final_newline: bool = True) -> None:
    """Writes `result` to `path` (indent 1) atomically, its folder made first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "w") as handle:
        json.dump(result, handle, indent=1)
        if final_newline:
            handle.write("\n")
