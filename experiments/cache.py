"""The stage cache of a run: one output directory, one JSON record per finished
stage, keyed by a digest of everything the stage's result depends on.

    run = RunDirectory("runs/cartpole/pure", force=False)
    result = run.cached("prediction_persim", key)      # None: not done with this key
    run.store("prediction_persim", key, result, seconds)

The cache trusts nothing it cannot read: a record that is not valid JSON or not
one of ours is reported in one warning line naming the file and redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

from absl import logging

from persim_jax import data


def digest(payload) -> str:
    """A short SHA-256 of `payload` (JSON-able): the stages' cache keys."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def say(message: str) -> None:
    """A progress line of the pipeline (absl logging, INFO, at the caller's line)."""
    logging.info("%s", message, stacklevel=2)


def warn_damaged(path: str, what: str, error: Exception | str) -> None:
    """One warning line: a damaged file of ours is redone."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    logging.warning("%s: damaged %s (%s); rebuilding it", path, what, reason)


class RunDirectory:
    """The output directory of one run, its stage records and timings.

    Attributes:
      directory: where every output of the run goes.
      force: redo every stage, ignoring stored records.
      timing: {stage: seconds} of the stages done or reused so far.
    """

    def __init__(self, directory: str, force: bool):
        self.directory = directory
        self.force = force
        self.timing: dict[str, float] = {}

    def path(self, *parts) -> str:
        return os.path.join(self.directory, *parts)

    def record_path(self, stage: str) -> str:
        return self.path("stages", f"{stage}.json")

    def cached(self, stage: str, key: str):
        """The stored result of `stage` if it was done with `key`, else None
        (a damaged record is warned about and treated as absent)."""
        path = self.record_path(stage)
        if self.force or not os.path.exists(path):
            return None
        try:
            with open(path) as handle:
                record = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            warn_damaged(path, "stage record", error)
            return None
        if not isinstance(record, dict) or "key" not in record or "result" not in record:
            warn_damaged(path, "stage record", "not a stage record")
            return None
        if record["key"] != key:
            return None
        seconds = record.get("seconds", 0.0)
        self.timing[stage] = seconds if isinstance(seconds, (int, float)) else 0.0
        return record["result"]

    def store(self, stage: str, key: str, result, seconds: float):
        """Records `result` of `stage` done with `key` (atomically) and returns it."""
        self.timing[stage] = round(seconds, 2)
        os.makedirs(self.path("stages"), exist_ok=True)
        data.write_json(self.record_path(stage), {"key": key, "seconds": round(seconds, 2),
                                                  "result": result})
        return result

    def sum_timings(self, stage: str) -> None:
        """One timing for `stage` from its per-method / per-trial records."""
        parts = [name for name in self.timing if name.startswith(f"{stage}_")]
        if parts:
            self.timing[stage] = round(self.timing.get(stage, 0.0)
                                       + sum(self.timing.pop(name) for name in parts), 2)

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        """Progress lines around a stage: what it does, then how long it took."""
        say(f"[{name}] {what}")
        start = time.time()
        yield
        say(f"[{name}] done in {time.time() - start:.1f} s")
