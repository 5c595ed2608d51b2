"""Moved: `persim_jax.persim.train`. This re-export keeps the old imports working
until their callers are updated (issue 28)."""

from persim_jax.persim import model as model_lib  # noqa: F401
from persim_jax.persim.train import (  # noqa: F401
    CHECKPOINT_FORMAT,
    RANK_CANDIDATES,
    VALIDATION_CHUNK,
    Batch,
    EpochMetrics,
    TrainConfig,
    TrainState,
    chunk_batch,
    fit,
    init_train_state,
    loss_fn,
    make_batch,
    make_epoch_fn,
    make_optimizer,
    validation_split,
)
