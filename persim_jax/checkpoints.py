"""Resumable training checkpoints, shared by every trainer of the project.

A trainer's loop state (parameters, optimiser state, counters: any pytree of
arrays) is saved with orbax under a step number (epochs, iterations, ...),
beside a JSON "run description" of what must match to resume it: the data's
digest, the config and the key. Resuming a directory that holds another run
is refused with an error naming the fields that differ. A checkpoint that
cannot be read (half-written, truncated, corrupted) is discarded with a
one-line warning naming the directory, and the run starts from scratch.

The loop that uses them is `persim_jax.training.run_loop`:

    manager = checkpoints.manager(directory)
    state, start = checkpoints.restore_latest(manager, state, run, total=epochs, unit="epoch")
    for step in range(start, epochs):
        state = ...
        checkpoints.save(manager, step + 1, state, run, force=step + 1 == epochs)
    checkpoints.close(manager)
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


def manager(directory: str | os.PathLike, every: int = 1):
    """An orbax `CheckpointManager` in `directory` (created), keeping the two
    latest steps; `every`: save only steps that are multiples of it (unless
    forced)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=2, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                                 item_names=("state", "run"))


def save(manager, step: int, state: Any, run: dict, *, force: bool = False) -> None:
    """Saves `state` and its run description as step `step`."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               run=ocp.args.JsonSave(run)), force=force)


def restore_latest(manager, state: Any, run: dict, *, total: int, unit: str) -> tuple[Any, int]:
    """(state, completed steps) from `manager`'s latest checkpoint, or
    (`state`, 0) when there is none, or when it cannot be read (a warning,
    and the directory's checkpoints are discarded).

    Args:
      manager: from `manager`.
      state: a pytree of the saved structure (its shapes and dtypes are the
        restore template).
      run: this run's description; the saved one must be equal.
      total: the steps this run trains; a checkpoint past it is refused.
      unit: the name of a step in error messages ("epoch", "iteration").

    Raises:
      ValueError: the checkpoint holds another run, or is past `total`.
    """
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return state, 0
    try:
        saved = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except Exception as error:  # noqa: BLE001 -- any unreadable file: start again
        return _discard(manager, step, error, state)
    differ = sorted(k for k in set(run) | set(saved) if run.get(k) != saved.get(k))
    if differ:
        raise ValueError(
            f"checkpoint_dir: {manager.directory} holds a different run (differs in "
            f"{', '.join(differ)}); use another directory or delete it")
    if step > total:
        raise ValueError(f"{unit}s: the checkpoint in {manager.directory} is at {unit} {step}, "
                         f"past {unit}s={total}")
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template)))["state"]
    except Exception as error:  # noqa: BLE001
        return _discard(manager, step, error, state)
    return restored, step


def _discard(manager, step: int, error: Exception, state: Any) -> tuple[Any, int]:
    """Warns that step `step` of `manager` is damaged, deletes every step of
    its directory (a later save must not be refused as older than the damaged
    one), and returns (`state`, 0): the run starts from scratch."""
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    logging.warning("checkpoint_dir: %s: damaged checkpoint at step %d (%s); training starts "
                    "from scratch", manager.directory, step, reason)
    for saved in manager.all_steps():
        path = os.path.join(os.fspath(manager.directory), str(saved))
        shutil.rmtree(path, ignore_errors=True)
    manager.reload()
    return state, 0


def close(manager) -> None:
    """Waits for pending saves and releases the manager (None: nothing)."""
    if manager is not None:
        manager.wait_until_finished()
        manager.close()


def data_digest(arrays: Iterable) -> str:
    """SHA-256 of the arrays' shapes, dtypes and bytes: the data part of a run
    description."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def key_list(key: jax.Array) -> list:
    """A PRNG key (raw or typed) as a JSON-able list of integers."""
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).tolist()
