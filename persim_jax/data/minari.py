"""Minari datasets in and out, keeping who each agent is.

Minari (Farama's standard for offline RL data) stores episodes; PerSim needs
to know which agent lived each one. `to_minari` writes `Transitions` as a
local Minari dataset and `from_minari` reads one back, exactly:

  * every Minari episode is one stretch of one agent's trajectory: the
    agent's rows in time order, its T states plus its last next state as the
    T + 1 observations. An agent whose trajectory breaks (its next state is
    not the next row's state, or a row is done or timed out before its last)
    becomes several episodes with the same agent id, in order;
  * each episode's metadata holds `agent_id` (`Transitions.agent_keys[i]`,
    or i when there are none) and, when the dataset has covariates,
    `covariates` (the agent's P values, a list);
  * the dataset's metadata holds a `persim` block: the format, the number
    of agents, whether the ids are keys or indices, `state_names`,
    `covariate_names`, and what the caller passes as `source`.

Why episode metadata: an id and covariates belong to an episode, and Minari
keeps a metadata dict per episode in both of its storage formats (a JSON file
per episode in "arrow", group attributes in "hdf5"; `MinariStorage.
update_episode_metadata` / `get_episode_metadata`, what Minari's own
`DataCollector` writes through its `EpisodeMetadataCallback`). It survives
the round trip exactly (ints and strings keep their type; JSON and HDF5 keep
float64, which holds every float32 covariate), and it stays attached to its
episode under `filter_episodes` and `split_dataset`, where a dataset-level
list of ids would silently shift. Per-step `infos` would also survive, but
would repeat the id T + 1 times. The names are the same for every agent, so
they live once, in the dataset's metadata. (Minari 0.5.4's
`combine_datasets` copies infos but not episode metadata: a combined dataset
reads back one agent per episode, with a warning. Combine the Transitions and
write them again instead.)

A Minari dataset written by anybody loads: with `agent_id` in its episodes'
metadata, the episodes of one id are one agent (first appearance order); with
none, every episode is one agent (a logging warning says so).

Spaces are built from the data, no env needed: a float32 `Box(-inf, inf,
(D,))` of states, `Discrete(num_actions)` or a float32 `Box(-inf, inf, (A,))`
of actions. `minari` is imported inside the functions: the rest of the
package works without it (`pip install -e '.[minari]'`). Datasets live under
`MINARI_DATASETS_PATH` (default `~/.minari/datasets`); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from typing import Any, Mapping

import numpy as np

from persim_jax.data.checks import check_array_values, plain, preview
from persim_jax.data.transitions import Transitions, make_transitions, validate_transitions

logger = logging.getLogger(__name__)

MINARI_FORMAT = "persim-jax-agents"
MINARI_FORMAT_VERSION = 1
INSTALL_HINT = "install the minari extra: pip install -e '.[minari]'"


def to_minari(transitions: Transitions, dataset_id: str, *, description: str | None = None,
              author: str | None = None, author_email: str | None = None,
              algorithm_name: str | None = None, code_permalink: str | None = None,
              source: Mapping[str, Any] | None = None, data_format: str = "hdf5",
              overwrite: bool = False):
    """Writes `transitions` as the local Minari dataset `dataset_id`.

    The dataset is built in a hidden folder under `MINARI_DATASETS_PATH`
    (which Minari's listings skip) and moved into place once complete, so an
    interrupted call leaves nothing behind under `dataset_id`. While it
    builds, the process's MINARI_DATASETS_PATH points at that folder (Minari
    offers no other way to write elsewhere): not for concurrent threads.

    Args:
      transitions: T transitions of N agents; each agent's rows in time order.
      dataset_id: Minari's `namespace/name-vN`, e.g. "persim/cartpole/pure-v0"
        (namespaces may nest; the version is required).
      description, author, author_email, algorithm_name, code_permalink:
        Minari's dataset metadata (Minari's warnings about the ones left out
        are silenced: none of them is needed to read the data back).
      source: optional JSON-able dict kept in the dataset's metadata under
        `persim.source` (how the data were made).
      data_format: Minari's storage, "hdf5" (Minari's default; needs h5py) or
        "arrow" (needs pyarrow).
      overwrite: replace an existing dataset of that id instead of raising.

    Returns:
      The written `minari.MinariDataset`, with one episode per unbroken
      stretch of an agent's trajectory, agents in index order.

    Raises:
      ImportError: minari (or the storage's library) is not installed.
      ValueError: a malformed id, agent ids that are not numbers or strings,
        or any check of `validate_transitions`.
      FileExistsError: the id exists locally and `overwrite` is False.
    """
    minari = _import_minari()
    validate_transitions(transitions)
    check_dataset_id(dataset_id)
    keys = _agent_keys(transitions)
    buffers, episode_agents = _episode_buffers(transitions)
    root = os.fspath(_datasets_root())
    final = os.path.join(root, dataset_id)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"{dataset_id}: a Minari dataset of that id already exists at "
                              f"{final}; pass overwrite=True or choose another id / version")
    covariates = (None if transitions.covariates is None
                  else np.asarray(transitions.covariates, np.float32))
    episode_metadata = [
        {"agent_id": keys[agent]} if covariates is None else
        {"agent_id": keys[agent], "covariates": [float(x) for x in covariates[agent]]}
        for agent in episode_agents]
    block = {"format": MINARI_FORMAT, "version": MINARI_FORMAT_VERSION,
             "num_agents": transitions.num_agents,
             "agent_ids": "indices" if transitions.agent_keys is None else "keys",
             "state_names": _listed(transitions.state_names),
             "covariate_names": _listed(transitions.covariate_names),
             "source": None if source is None else dict(source)}
    staging = tempfile.mkdtemp(prefix=".persim-staging-", dir=root)
    try:
        with _minari_root(staging), warnings.catch_warnings():
            # Minari nags about every optional field left None.
            warnings.filterwarnings("ignore", message=r".*is set to None", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"env_spec is None", category=UserWarning)
            staged = minari.create_dataset_from_buffers(
                dataset_id, buffers, observation_space=_state_space(transitions),
                action_space=_action_space(transitions), description=description, author=author,
                author_email=author_email, algorithm_name=algorithm_name,
                code_permalink=code_permalink, data_format=data_format)
            staged.storage.update_episode_metadata(episode_metadata, range(len(buffers)))
            staged.storage.update_metadata({"persim": block})
        _move_into_place(os.path.join(staging, dataset_id), final, _namespace_files(
            staging, root, dataset_id))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return minari.load_dataset(dataset_id, download=False)


def from_minari(dataset, *, allow_outliers: bool = False) -> Transitions:
    """Reads a Minari dataset (a `minari.MinariDataset`, or the id of a local one) as Transitions.

    Episodes with the same `agent_id` in their metadata are one agent, in
    order of first appearance, their rows in episode order; `covariates` in
    the episodes' metadata become the agents' covariates; the `persim` block
    of a dataset written by `to_minari` gives back the names and whether the
    ids were keys. Without any `agent_id`, each episode is one agent (logged
    as a warning), its Minari episode id kept as its key when the episodes are
    not 0..N-1.

    Args:
      dataset: a `minari.MinariDataset` (any view, e.g. `filter_episodes`),
        or the id of a dataset under `MINARI_DATASETS_PATH` (never
        downloaded).
      allow_outliers: accept values far outside their column's own scale
        (`check_column_values`), as `load_npz`.

    Returns:
      Transitions ordered by agent, then time: for a dataset written by
      `to_minari`, the same Transitions (rows grouped by agent).

    Raises:
      ImportError: minari is not installed.
      FileNotFoundError: the id is not local (the message lists what is).
      ValueError: a malformed id; spaces other than a flat Box of states and
        a Discrete / flat Box of actions; an episode without a step or whose
        arrays disagree with the spaces or with each other; agent ids on only
        some episodes; covariates missing for some agents, of different
        lengths, or differing between one agent's episodes.
    """
    _import_minari()
    if isinstance(dataset, str):
        dataset = load_local(dataset)
    name = _name_of(dataset)
    obs_dim = _state_dim(name, dataset.observation_space)
    num_actions, action_shape = _action_kind(name, dataset.action_space)
    indices = [int(i) for i in np.asarray(dataset.episode_indices)]
    if not indices:
        raise ValueError(f"{name}: the dataset has no episodes")
    episode_metadata = [{k: _plain(v) for k, v in m.items()}
                        for m in dataset.storage.get_episode_metadata(indices)]
    pieces = [_episode_arrays(name, episode, obs_dim, action_shape)
              for episode in dataset.iterate_episodes(indices)]
    block = dataset.storage.metadata.get("persim")
    if not isinstance(block, dict) or block.get("format") != MINARI_FORMAT:
        block = {}
    keys, agent_of_episode = _agents_of_episodes(name, indices, episode_metadata)
    num_agents = int(agent_of_episode.max()) + 1
    covariates = _covariates_of(name, indices, episode_metadata, agent_of_episode, num_agents)
    # Rows grouped by agent (first appearance), episodes in order within each.
    order = np.argsort(agent_of_episode, kind="stable")
    arrays = {field: np.concatenate([pieces[e][field] for e in order]) for field in pieces[0]}
    agent_id = np.concatenate([np.full(len(pieces[e]["reward"]), agent_of_episode[e])
                               for e in order])
    checked = ("obs", "next_obs", "reward") + (("action",) if num_actions is None else ())
    for field in checked:
        check_array_values(field, arrays[field], allow_outliers)
    if covariates is not None:
        check_array_values("covariates", covariates, allow_outliers)
    if block.get("agent_ids") == "indices" and keys == tuple(range(num_agents)):
        keys = None      # written from Transitions without agent_keys
    try:
        return make_transitions(
            arrays["obs"], arrays["action"], arrays["next_obs"], agent_id,
            reward=arrays["reward"], done=arrays["done"], timeout=arrays["timeout"],
            num_agents=num_agents, num_actions=num_actions, covariates=covariates,
            agent_keys=keys, state_names=block.get("state_names"),
            covariate_names=block.get("covariate_names") if covariates is not None else None)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def load_local(dataset_id: str):
    """The local Minari dataset `dataset_id` (never downloaded).

    Raises:
      ImportError: minari is not installed.
      ValueError: a malformed id.
      FileNotFoundError: no such dataset under `MINARI_DATASETS_PATH`; the
        message lists the local ones.
    """
    minari = _import_minari()
    check_dataset_id(dataset_id)
    root = _datasets_root()
    if not os.path.isdir(os.path.join(root, dataset_id, "data")):
        local = local_dataset_ids()
        raise FileNotFoundError(
            f"{dataset_id}: no such local Minari dataset under {root} (MINARI_DATASETS_PATH); "
            f"local datasets: {', '.join(local) if local else 'none'}")
    return minari.load_dataset(dataset_id, download=False)


def local_dataset_ids() -> list[str]:
    """The ids of the Minari datasets under `MINARI_DATASETS_PATH`, sorted."""
    minari = _import_minari()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # Minari warns about each misconfigured folder
        return sorted(minari.list_local_datasets())


def check_dataset_id(dataset_id: str) -> None:
    """ValueError unless `dataset_id` is Minari's `(namespace/)name-vN`."""
    _import_minari()
    from minari.dataset.minari_dataset import DATASET_ID_RE

    match = DATASET_ID_RE.fullmatch(dataset_id) if isinstance(dataset_id, str) else None
    if match is None or match.group("version") is None:
        raise ValueError(f"dataset id {dataset_id!r}: expected Minari's form "
                         f"'namespace/name-vN', e.g. 'persim/cartpole/pure-v0' (namespaces of "
                         f"at least two characters, letters, digits, - and _; the version "
                         f"required)")


# ---------------------------------------------------------------------------
# Writing


def _episode_buffers(transitions: Transitions) -> tuple[list, np.ndarray]:
    """(EpisodeBuffers, (E,) agent index of each): each agent's rows in time
    order, cut where its trajectory breaks or a row is done / timed out."""
    from minari.data_collector import EpisodeBuffer

    agent_id = np.asarray(transitions.agent_id)
    order = np.argsort(agent_id, kind="stable")          # by agent, time order kept
    fields = {name: np.asarray(getattr(transitions, name))[order]
              for name in ("obs", "action", "next_obs", "reward", "done", "timeout")}
    agents = agent_id[order]
    obs, next_obs = fields["obs"], fields["next_obs"]
    broken = np.any(next_obs[:-1] != obs[1:], axis=1)
    starts = np.flatnonzero(np.concatenate([
        [True], (agents[1:] != agents[:-1]) | fields["done"][:-1] | fields["timeout"][:-1]
        | broken]))
    unflagged = np.flatnonzero(broken & (agents[1:] == agents[:-1])
                               & ~fields["done"][:-1] & ~fields["timeout"][:-1])
    if unflagged.size:
        logger.info("%d break(s) inside agents' trajectories without a done or timeout flag "
                    "(next_obs differs from the next row's obs), e.g. agent %s: each stretch "
                    "is its own episode, with the agent's id", unflagged.size,
                    agents[unflagged[0]])
    stops = np.append(starts[1:], agents.size)
    buffers = [EpisodeBuffer(
        id=k, observations=np.concatenate([obs[start:stop], next_obs[stop - 1:stop]]),
        actions=fields["action"][start:stop], rewards=fields["reward"][start:stop],
        terminations=fields["done"][start:stop], truncations=fields["timeout"][start:stop])
        for k, (start, stop) in enumerate(zip(starts, stops))]
    return buffers, agents[starts]


def _agent_keys(transitions: Transitions) -> list:
    """The N ids written to the episodes: the agent keys, or 0..N-1."""
    if transitions.agent_keys is None:
        return list(range(transitions.num_agents))
    keys = [plain(k) for k in transitions.agent_keys]
    bad = [k for k in keys if not isinstance(k, (str, int, float)) or isinstance(k, bool)]
    if bad:
        raise ValueError(f"agent_keys: Minari episode metadata holds numbers and strings; got "
                         f"{preview(bad)}")
    if len(set(keys)) != len(keys):
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        raise ValueError(f"agent_keys: ids {repeated} name several agents; each agent needs "
                         f"its own id")
    return keys


def _state_space(transitions: Transitions):
    import gymnasium as gym

    return gym.spaces.Box(-np.inf, np.inf, (transitions.obs_dim,), np.float32)


def _action_space(transitions: Transitions):
    import gymnasium as gym

    if transitions.discrete:
        return gym.spaces.Discrete(transitions.num_actions)
    return gym.spaces.Box(-np.inf, np.inf, (transitions.action_dim,), np.float32)


def _listed(names):
    return None if names is None else [str(n) for n in names]


def _namespace_files(staging: str, root: str, dataset_id: str) -> list[tuple[str, str]]:
    """(staged, final) paths of the namespace metadata files that Minari made
    for `dataset_id`'s namespaces and that the final root lacks."""
    parts = dataset_id.split("/")[:-1]
    pairs = []
    for depth in range(1, len(parts) + 1):
        relative = os.path.join(*parts[:depth], "namespace_metadata.json")
        if os.path.exists(os.path.join(staging, relative)) and not os.path.exists(
                os.path.join(root, relative)):
            pairs.append((os.path.join(staging, relative), os.path.join(root, relative)))
    return pairs


def _move_into_place(staged: str, final: str, namespace_files) -> None:
    """Renames the complete staged dataset folder to `final` (replacing an
    old one), with the namespace files Minari lists namespaces by."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    for source, target in namespace_files:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=".persim-replaced-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(old, "dataset"))
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# Reading


def _state_dim(name: str, space) -> int:
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"{name}: observation space {space}: PerSim needs states as a flat "
                         f"Box of shape (D,)")
    return int(space.shape[0])


def _action_kind(name: str, space) -> tuple[int | None, tuple]:
    """(num_actions, ()) for Discrete(n) actions, (None, (A,)) for a flat Box."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Discrete):
        if int(space.start) != 0:
            raise ValueError(f"{name}: action space {space} starts at {int(space.start)}; "
                             f"PerSim's discrete actions are 0..n-1")
        return int(space.n), ()
    if isinstance(space, gym.spaces.Box) and len(space.shape) <= 1:
        return None, (int(np.prod(space.shape)),)
    raise ValueError(f"{name}: action space {space}: PerSim needs Discrete(n) or a flat Box "
                     f"of continuous actions")


def _episode_arrays(name: str, episode, obs_dim: int, action_shape: tuple) -> dict:
    """One episode's T transitions: obs and next_obs from its T + 1
    observations, checked against the spaces and each other."""
    where = f"{name}: episode {episode.id}"
    observations = episode.observations
    if not isinstance(observations, np.ndarray) or observations.dtype.kind not in "iubf":
        raise ValueError(f"{where}: observations are not an array of numbers "
                         f"({type(observations).__name__})")
    actions = np.asarray(episode.actions)
    steps = len(actions)
    if steps == 0 or len(observations) < 2:
        raise ValueError(f"{where}: no step ({len(observations)} observation(s), {steps} "
                         f"action(s)); every episode needs at least one transition")
    if observations.shape != (steps + 1, obs_dim):
        raise ValueError(f"{where}: observations of shape {observations.shape}, expected "
                         f"(T + 1, D) = ({steps + 1}, {obs_dim}) for its {steps} actions and "
                         f"the observation space's {obs_dim} dimensions")
    if action_shape:
        actions = actions.reshape(steps, -1) if actions.ndim == 1 and action_shape == (1,) \
            else actions
        if actions.shape != (steps, *action_shape):
            raise ValueError(f"{where}: actions of shape {actions.shape}, expected "
                             f"({steps}, {action_shape[0]})")
    elif actions.shape != (steps,):
        raise ValueError(f"{where}: discrete actions of shape {actions.shape}, expected "
                         f"({steps},)")
    arrays = {"obs": observations[:-1], "action": actions, "next_obs": observations[1:]}
    for field, values in (("reward", episode.rewards), ("done", episode.terminations),
                          ("timeout", episode.truncations)):
        values = np.asarray(values)
        if values.shape != (steps,):
            raise ValueError(f"{where}: {len(values)} {_MINARI_NAMES[field]} for {steps} "
                             f"actions")
        arrays[field] = values
    return arrays


_MINARI_NAMES = {"reward": "rewards", "done": "terminations", "timeout": "truncations"}


def _agents_of_episodes(name: str, indices: list[int], metadata: list[dict]):
    """(agent keys, (E,) agent index of each episode) from the episodes'
    `agent_id`, or one agent per episode when none has one (keys: the
    episode ids, None when they are 0..E-1)."""
    has_id = ["agent_id" in m for m in metadata]
    if not any(has_id):
        logger.warning("%s: no agent_id in the episodes' metadata; each of its %d episodes is "
                       "taken as one agent", name, len(indices))
        keys = None if indices == list(range(len(indices))) else tuple(indices)
        return keys, np.arange(len(indices))
    if not all(has_id):
        missing = [i for i, has in zip(indices, has_id) if not has]
        raise ValueError(f"{name}: episode(s) {preview(missing)} have no agent_id in their "
                         f"metadata while others have one; give every episode its agent's id")
    position: dict = {}
    agent_of_episode = np.empty(len(indices), np.int64)
    for e, (index, meta) in enumerate(zip(indices, metadata)):
        key = meta["agent_id"]
        if not isinstance(key, (str, int, float)) or isinstance(key, bool):
            raise ValueError(f"{name}: episode {index}: agent_id {key!r} is not a number or a "
                             f"string")
        agent_of_episode[e] = position.setdefault(key, len(position))
    return tuple(position), agent_of_episode


def _covariates_of(name: str, indices: list[int], metadata: list[dict],
                   agent_of_episode: np.ndarray, num_agents: int):
    """(N, P) covariates from the episodes' metadata, or None if none has any."""
    has = ["covariates" in m for m in metadata]
    if not any(has):
        return None
    if not all(has):
        missing = [i for i, h in zip(indices, has) if not h]
        raise ValueError(f"{name}: episode(s) {preview(missing)} have no covariates in their "
                         f"metadata while others have them")
    values = [np.atleast_1d(np.asarray(m["covariates"], np.float64)) for m in metadata]
    widths = {v.shape for v in values}
    if len(widths) > 1 or values[0].ndim != 1:
        raise ValueError(f"{name}: the episodes' covariates have different shapes "
                         f"{sorted(widths)}; each needs the same P values")
    covariates = np.empty((num_agents, values[0].shape[0]), np.float64)
    seen = np.zeros(num_agents, bool)
    for index, agent, value in zip(indices, agent_of_episode, values):
        if seen[agent] and not np.array_equal(covariates[agent], value):
            raise ValueError(f"{name}: episode {index}: covariates {value.tolist()} differ from "
                             f"those of another episode of the same agent "
                             f"({covariates[agent].tolist()})")
        covariates[agent], seen[agent] = value, True
    return covariates


def _plain(value):
    """A metadata value as Python has it (HDF5 gives numpy scalars and arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return plain(value)


def _name_of(dataset) -> str:
    try:
        return str(dataset.spec.dataset_id)
    except (AttributeError, KeyError):
        return "the Minari dataset"


# ---------------------------------------------------------------------------
# Minari itself


def _import_minari():
    try:
        import minari
    except ImportError as error:
        raise ImportError(f"Minari datasets need the minari package: {INSTALL_HINT}") from error
    return minari


def _datasets_root():
    """Where local datasets live: `MINARI_DATASETS_PATH` or ~/.minari/datasets."""
    from minari.storage import get_dataset_path

    return get_dataset_path()


@contextlib.contextmanager
def _minari_root(path: str):
    """Points Minari at `path` for the block (Minari reads
    MINARI_DATASETS_PATH at every call and offers no other way to write
    elsewhere); the old value is restored."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
