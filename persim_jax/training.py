"""The resumable, checkpointed training loop shared by every trainer of the project.

PerSim's `fit` (epochs), CaDM's `fit` (iterations) and BCQ's `fit` (chunks of
iterations) each own their compiled program; `run_loop` only drives it:

    def step_fn(state, start, length):       # steps start .. start+length-1
        state, metrics = program(state, ...)
        return state, metrics

    state, history = training.run_loop(state, step_fn, num_steps=epochs,
                                       checkpoint_dir=directory, run_description=run)

It resumes from the directory's latest checkpoint (refusing one of another
run), saves every `checkpoint_every` steps and after the last one, shows a
tqdm bar and hands each step's metrics to `callback` (as brax's
`progress_fn`). A damaged checkpoint (a half-written or corrupted step) is
not an error: the loop warns in one line naming the directory, discards it
and trains from scratch (`persim_jax.checkpoints.restore_latest`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from tqdm.auto import tqdm

from persim_jax import checkpoints

# step_fn(state, start, length) -> (state, metrics): steps start..start+length-1.
StepFn = Callable[[Any, int, int], tuple[Any, Any]]


def run_loop(state: Any, step_fn: StepFn, *, num_steps: int, chunk: int = 1,
             checkpoint_dir: str | os.PathLike | None = None, run_description: dict | None = None,
             checkpoint_every: int = 1, unit: str = "step", desc: str | None = None,
             progress: bool = True, postfix: Callable[[Any], dict] | None = None,
             callback: Callable[[Any], None] | None = None) -> tuple[Any, list]:
    """Runs `step_fn` over steps 0..num_steps-1, `chunk` steps per call.

    Args:
      state: the initial loop state (a pytree of arrays: what is checkpointed;
        also the template a checkpoint is restored into).
      step_fn: (state, start, length) -> (state, metrics), steps
        start..start+length-1 (length = chunk, less for the last call).
      num_steps: the steps of the whole run (epochs, iterations).
      chunk: steps per call of `step_fn`.
      checkpoint_dir: if given, orbax checkpoints of `state` are written here
        (step numbers = completed steps) whenever the completed steps reach a
        multiple of `checkpoint_every`, and after the last step; a later call
        resumes from the latest one. A directory holding another run is
        refused (ValueError); a damaged checkpoint is warned about and
        discarded, and the run starts from scratch.
      run_description: JSON-able description of what must match to resume
        (the data's digest, config, key); required with `checkpoint_dir`.
      checkpoint_every: K, steps between checkpoints.
      unit: the name of a step ("epoch", "iteration") for the bar and errors.
      desc: the progress bar's label.
      progress: show a tqdm bar.
      postfix: metrics -> {name: text} shown beside the bar.
      callback: called with each call's metrics, after any checkpoint of it
        is written.

    Returns:
      (final state, [metrics of each call of this run], in order); a resumed
      run lists the calls it made only.
    """
    manager, bar, history = None, None, []
    try:
        start = 0
        if checkpoint_dir is not None:
            manager = checkpoints.manager(checkpoint_dir, checkpoint_every)
            state, start = checkpoints.restore_latest(manager, state, run_description,
                                                      total=num_steps, unit=unit)
        bar = tqdm(total=num_steps, initial=start, disable=not progress, desc=desc, unit=unit,
                   leave=False)
        while start < num_steps:
            length = min(chunk, num_steps - start)
            state, metrics = step_fn(state, start, length)
            start += length
            # Orbax would also save the very first step; we save every K steps
            # and after the last one only.
            if manager is not None and (start % checkpoint_every == 0 or start == num_steps):
                checkpoints.save(manager, start, state, run_description, force=True)
            history.append(metrics)
            bar.update(length)
            if postfix is not None:
                bar.set_postfix(postfix(metrics))
            if callback is not None:
                callback(metrics)
    finally:
        if bar is not None:
            bar.close()
        checkpoints.close(manager)
    return state, history
