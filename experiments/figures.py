"""Figures of an experiment (matplotlib, Agg backend), each PNG written atomically.

- `plot_tsne`: t-SNE of the learned agent factors in 2-D, one scatter per
  covariate coloured by it (the paper's Figures 1 and 5).
- `plot_tsne_factors`: the same embedding alone, for data without covariates.
- `plot_trajectories`: predicted vs true states of a few test agents, one
  column per agent and one row per state dimension (the paper's Figure 4).

    from experiments import figures
    paths = figures.plot_tsne(factors, covariates, ["force", "length"], "runs/cp/tsne")
    # -> ["runs/cp/tsne_force.png", "runs/cp/tsne_length.png"]
    figures.plot_trajectories(true, pred, valid, "runs/cp/trajectories.png",
                              ["force=2, length=0.5", "force=18, length=0.5"])
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from persim_jax.data import atomic_write  # noqa: E402


def save_figure(fig, path: str) -> str:
    """Writes `fig` as PNG to a temporary file beside `path`, then renames it
    (with a new file's usual permissions, `atomic_write`)."""
    try:
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# Agents are named on a t-SNE figure when there are at most this many.
MAX_LABELLED_AGENTS = 40


def _label_points(ax, embedding: np.ndarray, labels: Sequence[str] | None) -> None:
    if labels is None or len(labels) > MAX_LABELLED_AGENTS:
        return
    for (x, y), label in zip(embedding, labels):
        ax.annotate(str(label), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "covariate"


def tsne_embedding(factors: np.ndarray, random_state: int = 0) -> np.ndarray:
    """(N, r) agent factors -> (N, 2) t-SNE embedding, perplexity min(30, N - 1)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 2:
        raise ValueError(f"factors must be (N, r), got shape {factors.shape}")
    n = factors.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 agents, got {n}")
    if factors.shape[1] == 1:  # t-SNE of a line: pad a constant dimension
        factors = np.concatenate([factors, np.zeros_like(factors)], axis=1)
    tsne = TSNE(n_components=2, perplexity=min(30.0, n - 1.0), init="pca",
                random_state=random_state)
    # One thread: t-SNE of a few hundred agents takes ~2 s, and OpenMP threads
    # on shared, busy cores made it 50x slower.
    with threadpool_limits(limits=1):
        return tsne.fit_transform(factors)


def plot_tsne(factors: np.ndarray, covariates: np.ndarray, names: Sequence[str],
              path_prefix: str | os.PathLike, highlight: Sequence[int] | None = None,
              member: int = 0, random_state: int = 0,
              labels: Sequence[str] | None = None) -> list[str]:
    """t-SNE of the agent factors, one PNG per covariate coloured by it.

    factors: (N, r), or (M, N, r) per ensemble member (member `member` is used:
    members' factors live in different bases). covariates: (N, P) with P names
    (each figure is titled by its covariate's name, e.g. the file's column).
    Writes f"{path_prefix}_{name}.png" for each covariate name and returns the
    paths. `highlight` marks some agents (e.g. the test agents 0..4); `labels`
    (N agent ids) names the points when there are at most 40 agents.
    """
    factors = np.asarray(factors)
    if factors.ndim == 3:
        factors = factors[member]
    covariates = np.asarray(covariates, dtype=np.float64)
    if covariates.ndim == 1:
        covariates = covariates[:, None]
    if covariates.shape[0] != factors.shape[0]:
        raise ValueError(f"factors have {factors.shape[0]} agents but covariates have "
                         f"{covariates.shape[0]}")
    if covariates.shape[1] != len(names):
        raise ValueError(f"covariates have {covariates.shape[1]} columns but {len(names)} "
                         f"names were given: {list(names)}")
    embedding = tsne_embedding(factors, random_state=random_state)
    prefix = os.fspath(path_prefix)
    paths = []
    for j, name in enumerate(names):
        fig, ax = plt.subplots(figsize=(4.6, 3.8))
        points = ax.scatter(embedding[:, 0], embedding[:, 1], c=covariates[:, j],
                            cmap="viridis", s=12)
        if highlight is not None:
            idx = np.asarray(list(highlight), dtype=int)
            ax.scatter(embedding[idx, 0], embedding[idx, 1], facecolors="none",
                       edgecolors="red", s=70, linewidths=1.2, label="test agents")
            ax.legend(loc="best", fontsize=8)
        _label_points(ax, embedding, labels)
        fig.colorbar(points, ax=ax, label=name)
        ax.set_title(f"Agent factors (t-SNE), coloured by {name}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        paths.append(save_figure(fig, f"{prefix}_{_file_safe(name)}.png"))
    return paths


def plot_tsne_factors(factors: np.ndarray, path: str | os.PathLike, member: int = 0,
                      random_state: int = 0, labels: Sequence[str] | None = None) -> str:
    """t-SNE of the agent factors alone, for data without covariates.

    factors: (N, r) or (M, N, r) (member `member`). `labels`: N agent ids,
    drawn beside the points when there are at most 40 agents. Returns `path`.
    """
    factors = np.asarray(factors)
    if factors.ndim == 3:
        factors = factors[member]
    if labels is not None and len(labels) != factors.shape[0]:
        raise ValueError(f"{len(labels)} labels for {factors.shape[0]} agents")
    embedding = tsne_embedding(factors, random_state=random_state)
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    ax.scatter(embedding[:, 0], embedding[:, 1], color="tab:blue", s=12)
    _label_points(ax, embedding, labels)
    ax.set_title("Agent factors (t-SNE); no covariates to colour them by", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, os.fspath(path))


def plot_trajectories(true: np.ndarray, predicted: np.ndarray, valid: np.ndarray,
                      path: str | os.PathLike, agent_labels: Sequence[str],
                      state_names: Sequence[str] | None = None,
                      members: np.ndarray | None = None,
                      dims: Sequence[int] | None = None) -> str:
    """Predicted vs true state trajectories, one column per agent, one row per dim.

    true, predicted: (A, T, D); valid: (A, T) bool, steps after an episode's end
    are not drawn. members: optional (A, M, T, D) predictions of each ensemble
    member, drawn as thin lines around the ensemble mean. dims: the state
    dimensions to draw (default the first min(D, 6)). Returns `path`.
    """
    true = np.asarray(true, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    if true.ndim != 3 or true.shape != predicted.shape:
        raise ValueError(f"true and predicted must both be (A, T, D), got {true.shape} and "
                         f"{predicted.shape}")
    num_agents, steps, dim = true.shape
    if valid.shape != (num_agents, steps):
        raise ValueError(f"valid must be (A, T) = {(num_agents, steps)}, got {valid.shape}")
    if len(agent_labels) != num_agents:
        raise ValueError(f"{len(agent_labels)} agent labels for {num_agents} agents")
    if members is not None:
        members = np.asarray(members, dtype=np.float64)
        if members.ndim != 4 or members.shape[0] != num_agents or members.shape[2:] != (steps, dim):
            raise ValueError(f"members must be (A, M, T, D) with A, T, D = "
                             f"{(num_agents, steps, dim)}, got {members.shape}")
    dims = list(range(min(dim, 6))) if dims is None else [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < dim]
    if bad or not dims:
        raise ValueError(f"dims must be a non-empty subset of 0..{dim - 1}, got {dims}")
    if state_names is not None and len(state_names) != dim:
        raise ValueError(f"{len(state_names)} state names for {dim} state dimensions")

    mask = np.where(valid, 1.0, np.nan)[..., None]
    true, predicted = true * mask, predicted * mask
    t = np.arange(steps)
    fig, axes = plt.subplots(len(dims), num_agents, squeeze=False, sharex=True,
                             figsize=(3.4 * num_agents, 1.9 * len(dims) + 0.6))
    for col in range(num_agents):
        axes[0, col].set_title(agent_labels[col], fontsize=9)
        for row, d in enumerate(dims):
            ax = axes[row, col]
            if members is not None:
                for m in range(members.shape[1]):
                    ax.plot(t, members[col, m, :, d] * mask[col, :, 0], color="tab:orange",
                            alpha=0.25, linewidth=0.7)
            ax.plot(t, true[col, :, d], color="black", linewidth=1.3, label="true")
            ax.plot(t, predicted[col, :, d], color="tab:orange", linestyle="--",
                    linewidth=1.3, label="PerSim")
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(state_names[d] if state_names is not None else f"state {d}",
                              fontsize=8)
        axes[-1, col].set_xlabel("step", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, os.fspath(path))
