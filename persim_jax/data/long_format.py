"""Datasets in long format: one row per agent and time step (CSV, Parquet).

A row holds the agent id, the time step, the state s_t (the state columns, by
default every column whose name starts with `obs_`, in table order), the
action a_t taken at that step (by default the columns starting with
`action`), optionally the reward r_t and done flag of that step, and
optionally the agent's covariates (by default the columns starting with
`cov_`): one value per agent, repeated on each of its rows, read into
`Transitions.covariates` (N, P) with the column names in `covariate_names`.

Next states: if the table has next-state columns (by default the columns
starting with `next_obs_`), every row is a transition. Otherwise the next
state of a row is the state of the same agent's next row in time order, so
each agent's last row is dropped (its outcome was not logged), and so is any
row flagged done that has a later row (the later row is a reset, not the
outcome). An agent with a single row therefore has no transition and is
rejected.

`load_csv` (standard library, no pandas) and `load_parquet` (pyarrow) read a
file, `from_long_format` builds `Transitions` from columns already in memory,
and `save_csv` writes a dataset back with explicit next-state columns. Errors
name the column and the file line (CSV) or table row (Parquet).
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from persim_jax.data.checks import check_column_values, plain, preview
from persim_jax.data.files import atomic_write
from persim_jax.data.transitions import Transitions, make_transitions, validate_transitions

logger = logging.getLogger(__name__)


def load_csv(path: str | os.PathLike, **options) -> Transitions:
    """Reads a long-format CSV file: one row per agent and time step.

    Parsed with the standard library (no pandas). The first line is the
    header. See `from_long_format` for the columns and options.

    Raises:
      ValueError: naming the column and the file line for unparsable or
        non-finite values, and every check of `from_long_format`.
    """
    path = os.fspath(path)
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: the file is empty (no header line)") from None
        rows = []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}: line {line_number} has {len(row)} fields; the header "
                                 f"has {len(header)}")
            rows.append((line_number, row))
    lines = np.array([line for line, _ in rows], dtype=np.int64)
    columns = {name: [row[j] for _, row in rows] for j, name in enumerate(header)}
    return from_long_format(columns, row_labels=lines, source=f"{path}: line", **options)


def load_parquet(path: str | os.PathLike, **options) -> Transitions:
    """Reads a long-format Parquet file (needs `pyarrow`).

    Same columns and options as `load_csv` (see `from_long_format`); errors
    name the column and the 0-based table row.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ImportError("load_parquet needs pyarrow: pip install pyarrow") from error
    table = pq.read_table(os.fspath(path))
    columns = {name: table.column(name).to_numpy(zero_copy_only=False)
               for name in table.column_names}
    return from_long_format(columns, source=f"{os.fspath(path)}: row", **options)


def from_long_format(
    columns: Mapping[str, Sequence],
    *,
    agent_column: str = "agent_id",
    time_column: str | None = "time",
    state_columns: Sequence[str] | None = None,
    action_columns: Sequence[str] | None = None,
    next_state_columns: Sequence[str] | None = None,
    reward_column: str | None = "reward",
    done_column: str | None = "done",
    state_prefix: str = "obs_",
    action_prefix: str = "action",
    next_state_prefix: str = "next_obs_",
    covariate_columns: Sequence[str] | None = None,
    covariate_prefix: str | None = "cov_",
    discrete_actions: bool | None = None,
    num_actions: int | None = None,
    map_agent_ids: bool = False,
    covariates=None,
    allow_outliers: bool = False,
    row_labels: np.ndarray | None = None,
    source: str = "row",
) -> Transitions:
    """Builds Transitions from a long-format table (column name -> values).

    The layout, and how next states are found: the docstring of
    `persim_jax.data.long_format`.

    Args:
      columns: column name -> (R,) values (strings or numbers).
      agent_column: the agent id column (any ids with `map_agent_ids=True`,
        else integers 0..N-1).
      time_column: the time-step column; rows are sorted by it within each
        agent and duplicates are rejected. None: rows are in time order as
        given.
      state_columns, action_columns, next_state_columns, covariate_columns:
        explicit column names; None infers them by prefix (`state_prefix`,
        `action_prefix`, `next_state_prefix`, `covariate_prefix`; no
        covariates when `covariate_prefix` is None).
      reward_column, done_column: used when present in the table; None
        ignores them.
      discrete_actions: whether actions are discrete; None infers True when
        there is one action column whose values are all integers.
      num_actions: number of discrete actions (default: max action + 1).
      map_agent_ids: map arbitrary agent ids to 0..N-1, in sorted order; the
        original ids are kept in `Transitions.agent_keys`.
      covariates: optional (N, P) per-agent parameters, in agent index order
        (instead of covariate columns).
      allow_outliers: accept values more than `OUTLIER_FACTOR` times their
        column's typical magnitude (`check_column_values`); by default they
        are errors naming the row and column.
      row_labels: (R,) what to call each row in error messages (e.g. the
        file's line numbers); defaults to the 0-based row index.
      source: prefix of row references in error messages.

    Returns:
      Validated Transitions, with `state_names` (the state columns) and
      `covariate_names` (the covariate columns, if any).
    """
    table = _LongTable.of(columns, row_labels, source)
    if table.num_rows == 0:
        raise ValueError(f"{source.split(':')[0]}: the table has no rows")
    roles = _resolve_columns(
        table, agent_column=agent_column, time_column=time_column,
        state_columns=state_columns, action_columns=action_columns,
        next_state_columns=next_state_columns, reward_column=reward_column,
        done_column=done_column, state_prefix=state_prefix, action_prefix=action_prefix,
        next_state_prefix=next_state_prefix,
        covariate_columns=[] if covariates is not None else covariate_columns,
        covariate_prefix=None if covariates is not None else covariate_prefix)
    return _table_transitions(table, roles, discrete_actions=discrete_actions,
                              num_actions=num_actions, map_agent_ids=map_agent_ids,
                              covariates=covariates, allow_outliers=allow_outliers)


def _table_transitions(table: _LongTable, roles: _ColumnRoles, *,
                       discrete_actions: bool | None, num_actions: int | None,
                       map_agent_ids: bool, covariates, allow_outliers: bool) -> Transitions:
    """`from_long_format` once the columns' roles are known: checks the values,
    orders the rows by agent and time, pairs each with its successor."""
    for name in [*roles.state, *roles.action, *roles.next_state, *roles.covariates,
                 *([roles.reward] if roles.reward is not None else [])]:
        check_column_values(name, table.numeric(name), table.where,
                            allow_outliers=allow_outliers)
    raw_ids, ids, agent_keys = _agent_indices(table, roles.agent, map_agent_ids)
    order, same_agent = _sort_by_agent_and_time(table, roles.time, ids, raw_ids)
    state = np.stack([table.numeric(name) for name in roles.state], axis=1)
    action, discrete_actions = _parse_actions(table, roles.action, discrete_actions, num_actions)
    reward = (table.numeric(roles.reward) if roles.reward is not None
              else np.zeros(table.num_rows))
    done = (_parse_flags(table, roles.done) if roles.done is not None
            else np.zeros(table.num_rows, bool))
    rows, next_state = _pair_successors(table, roles.next_state, state, done, order, same_agent)
    num_agents = int(ids.max()) + 1 if agent_keys is None else len(agent_keys)
    _check_every_agent_has_a_transition(table, roles.agent, ids, rows, num_agents, agent_keys)
    if roles.covariates:
        covariates = _per_agent_values(table, roles.covariates, ids, raw_ids, num_agents,
                                       roles.agent)
    return make_transitions(
        state[rows], action[rows], next_state, ids[rows], reward=reward[rows], done=done[rows],
        num_agents=num_agents, num_actions=num_actions if discrete_actions else None,
        covariates=covariates, agent_keys=agent_keys, state_names=roles.state,
        covariate_names=roles.covariates or None)


class _LongTable(NamedTuple):
    """A long-format table (column name -> (R,) values) and how errors name its rows."""

    columns: Mapping[str, Sequence]
    labels: np.ndarray  # (R,) what to call each row in messages, e.g. file line numbers
    source: str  # prefix of row references, e.g. "data.csv: line"
    parsed: dict  # column name -> its (R,) float64 values, parsed once

    @classmethod
    def of(cls, columns: Mapping[str, Sequence], row_labels: np.ndarray | None,
           source: str) -> "_LongTable":
        num_rows = len(next(iter(columns.values()))) if columns else 0
        labels = np.arange(num_rows) if row_labels is None else np.asarray(row_labels)
        return cls(columns, labels, source, {})

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def where(self, row: int) -> str:
        """How messages refer to table row `row`, e.g. "data.csv: line 7"."""
        return f"{self.source} {self.labels[row]}"

    def require(self, name: str, role: str) -> None:
        """Raises a ValueError naming `role` and listing the columns if `name` is absent."""
        if name not in self.columns:
            raise ValueError(f"{role}: column {name!r} not found; columns are {self.names}")

    def numeric(self, name: str) -> np.ndarray:
        """(R,) float64 values of column `name`; rejects text, blanks, NaN and inf."""
        if name not in self.parsed:
            self.parsed[name] = self._parse_numbers(name)
        return self.parsed[name]

    def _parse_numbers(self, name: str) -> np.ndarray:
        values = self.columns[name]
        try:
            out = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            # Parse value by value to name the first row that is not a number.
            out = np.empty(len(values), np.float64)
            for i, value in enumerate(values):
                try:
                    out[i] = float(value) if value is not None and str(value).strip() else np.nan
                except ValueError:
                    raise ValueError(f"column {name!r}: {self.where(i)} has {plain(value)!r}, "
                                     f"not a number") from None
        bad = np.flatnonzero(~np.isfinite(out))
        if bad.size:
            raise ValueError(f"column {name!r}: {self.where(bad[0])} has "
                             f"{plain(values[bad[0]])!r} (missing, NaN or inf)")
        return out


class _ColumnRoles(NamedTuple):
    """Which columns of a long-format table hold what."""

    agent: str
    time: str | None  # None: rows are in time order; checked when the rows are sorted
    state: Sequence[str]  # D columns of s_t
    action: Sequence[str]  # one discrete or A continuous action columns
    next_state: Sequence[str]  # D columns of s_{t+1}, or empty: the agent's next row is s_{t+1}
    reward: str | None  # None: absent from the table, rewards are zero
    done: str | None  # None: absent from the table, no step is done
    covariates: Sequence[str]  # P columns constant within an agent, or empty


def _resolve_columns(table: _LongTable, *, agent_column: str, time_column: str | None,
                     state_columns: Sequence[str] | None, action_columns: Sequence[str] | None,
                     next_state_columns: Sequence[str] | None, reward_column: str | None,
                     done_column: str | None, state_prefix: str, action_prefix: str,
                     next_state_prefix: str, covariate_columns: Sequence[str] | None,
                     covariate_prefix: str | None) -> _ColumnRoles:
    """Finds the agent, state, action, next-state, reward, done and covariate columns.

    Columns not given are inferred by name prefix, in table order; a column
    claimed by an earlier role is not taken again. Raises a ValueError naming
    the role and listing the table's columns when one is missing.
    """
    names = table.names

    def by_prefix(prefix: str, exclude: Sequence[str]) -> list[str]:
        return [n for n in names if n.startswith(prefix) and n not in exclude]

    table.require(agent_column, "agent_column")
    special = [agent_column, time_column, reward_column, done_column]
    if covariate_columns is None:
        covariate_columns = by_prefix(covariate_prefix, special) if covariate_prefix else []
    for name in covariate_columns:
        table.require(name, "covariate_columns")
    special = [*special, *covariate_columns]
    if next_state_columns is None:
        next_state_columns = by_prefix(next_state_prefix, special)
    for name in next_state_columns:
        table.require(name, "next_state_columns")
    if state_columns is None:
        state_columns = by_prefix(state_prefix, [*special, *next_state_columns])
        if not state_columns:
            raise ValueError(f"state_columns: no column starts with {state_prefix!r}; pass "
                             f"state_columns=[...] or state_prefix=...; columns are {names}")
    if action_columns is None:
        action_columns = by_prefix(action_prefix, [*special, *state_columns, *next_state_columns])
        if not action_columns:
            raise ValueError(f"action_columns: no column starts with {action_prefix!r}; pass "
                             f"action_columns=[...] or action_prefix=...; columns are {names}")
    for name in state_columns:
        table.require(name, "state_columns")
    for name in action_columns:
        table.require(name, "action_columns")
    if next_state_columns and len(next_state_columns) != len(state_columns):
        raise ValueError(f"next_state_columns: {len(next_state_columns)} columns "
                         f"{list(next_state_columns)} for {len(state_columns)} state columns "
                         f"{list(state_columns)}")
    present = lambda name: name if name is not None and name in table.columns else None
    return _ColumnRoles(agent=agent_column, time=time_column, state=list(state_columns),
                        action=list(action_columns), next_state=list(next_state_columns),
                        reward=present(reward_column), done=present(done_column),
                        covariates=list(covariate_columns))


def _per_agent_values(table: _LongTable, names: Sequence[str], ids: np.ndarray,
                      raw_ids: np.ndarray, num_agents: int, agent_column: str) -> np.ndarray:
    """(N, P) values of the P covariate columns `names`, one per agent: each
    must be the same on every row of an agent (a ValueError names the column,
    the agent and the two rows that differ). `ids`: (R,) agent index of each
    row; `raw_ids`: (R,) the ids as in the file."""
    out = np.empty((num_agents, len(names)), np.float64)
    first_row = np.full(num_agents, -1)
    # Reversed assignment: the last write, the agent's first row, wins.
    first_row[ids[::-1]] = np.arange(len(ids))[::-1]
    for j, name in enumerate(names):
        values = table.numeric(name)
        first = values[first_row]                                       # (N,)
        differs = np.flatnonzero(values != first[ids])
        if differs.size:
            row = differs[0]
            agent = ids[row]
            raise ValueError(
                f"column {name!r}: agent {plain(raw_ids[row])!r} has {values[first_row[agent]]:g} "
                f"at {table.where(first_row[agent])} but {values[row]:g} at {table.where(row)}; "
                f"a covariate column (named by the covariate prefix, or covariate_columns) "
                f"holds one value per agent, the same on each of its rows (a quantity that "
                f"changes over time is a state: rename the column, or change the prefix)")
        out[:, j] = first
    return out


def _agent_indices(table: _LongTable, agent_column: str,
                   map_agent_ids: bool) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """Reads the agent id column and turns it into agent indices.

    Returns:
      (raw_ids, ids, agent_keys): the (R,) ids as read (integers when every id
      is one), the (R,) agent indices (the ids themselves, or with
      `map_agent_ids` their rank among the distinct ids), and the original id
      of each agent 0..N-1 (None without `map_agent_ids`).
    """
    where = table.where
    raw_ids = np.asarray(table.columns[agent_column])
    if raw_ids.dtype.kind in "OSU":
        missing = [i for i, v in enumerate(raw_ids) if v is None or not str(v).strip()]
        if missing:
            raise ValueError(f"column {agent_column!r}: {where(missing[0])} has no agent id")
        raw_ids = np.asarray([str(v).strip() for v in raw_ids])
        if all(_is_int(v) for v in raw_ids):
            # Integer ids read as text (CSV): compare them as numbers.
            raw_ids = np.asarray([int(v) for v in raw_ids], dtype=np.int64)
        elif not map_agent_ids:
            bad = next(i for i, v in enumerate(raw_ids) if not _is_int(v))
            raise ValueError(
                f"column {agent_column!r}: {where(bad)} has id {plain(raw_ids[bad])!r}; ids must "
                f"be integers 0..N-1, or pass map_agent_ids=True to map arbitrary ids to "
                f"0..N-1")
    elif not map_agent_ids:
        values = table.numeric(agent_column)
        bad = np.flatnonzero(values != np.round(values))
        if bad.size:
            raise ValueError(f"column {agent_column!r}: {where(bad[0])} has id {values[bad[0]]:g}; "
                             f"ids must be integers 0..N-1, or pass map_agent_ids=True")
        raw_ids = values.astype(np.int64)
    if map_agent_ids:
        keys, ids = np.unique(raw_ids, return_inverse=True)
        agent_keys = tuple(k.item() if hasattr(k, "item") else k for k in keys)
        logger.info("mapped %d agent ids to 0..%d: %s", len(keys), len(keys) - 1,
                    preview(agent_keys))
        return raw_ids, ids, agent_keys
    bad = np.flatnonzero(raw_ids < 0)
    if bad.size:
        raise ValueError(f"column {agent_column!r}: {where(bad[0])} has id {raw_ids[bad[0]]}; ids "
                         f"must be 0..N-1, or pass map_agent_ids=True")
    return raw_ids, raw_ids, None


def _sort_by_agent_and_time(table: _LongTable, time_column: str | None, ids: np.ndarray,
                            raw_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orders the R rows by agent, then time (file order without a time column).

    Returns:
      (order, same_agent): (R,) row indices in that order, and (R-1,) bool,
      whether sorted rows i and i+1 belong to the same agent.
    """
    if time_column is not None:
        table.require(time_column, "time_column (pass time_column=None if rows are in time order)")
        time = table.numeric(time_column)
    else:
        time = np.arange(table.num_rows, dtype=np.float64)
    # Stable sort: by agent, then time; a duplicated time step is ambiguous.
    order = np.lexsort((time, ids))
    same_agent = ids[order][1:] == ids[order][:-1]
    duplicated = np.flatnonzero(same_agent & (time[order][1:] == time[order][:-1]))
    if time_column is not None and duplicated.size:
        a, b = order[duplicated[0]], order[duplicated[0] + 1]
        raise ValueError(f"column {time_column!r}: {table.where(a)} and {table.where(b)} both "
                         f"give agent {plain(raw_ids[a])!r} time step {time[a]:g}")
    return order, same_agent


def _parse_actions(table: _LongTable, action_columns: Sequence[str],
                   discrete_actions: bool | None,
                   num_actions: int | None) -> tuple[np.ndarray, bool]:
    """Reads the action columns.

    Returns:
      (action, discrete): (R,) int64 discrete actions or (R, A) float32
      continuous ones, and whether they are discrete (inferred when
      `discrete_actions` is None: one column of integer values).
    """
    action_values = np.stack([table.numeric(n) for n in action_columns], axis=1)
    if discrete_actions is None:
        discrete_actions = (len(action_columns) == 1
                            and bool(np.all(action_values == np.round(action_values))))
    if not discrete_actions:
        return action_values.astype(np.float32), discrete_actions
    if len(action_columns) != 1:
        raise ValueError(f"action_columns: discrete actions need one column; got "
                         f"{list(action_columns)}")
    column = action_values[:, 0]
    bad = np.flatnonzero(column != np.round(column))
    if bad.size:
        raise ValueError(f"column {action_columns[0]!r}: {table.where(bad[0])} has "
                         f"{column[bad[0]]:g}, not an integer action (continuous actions: "
                         f"discrete_actions=False, or leave it out to infer it)")
    if num_actions is not None:
        bad = np.flatnonzero((column < 0) | (column >= num_actions))
        if bad.size:
            raise ValueError(f"column {action_columns[0]!r}: {table.where(bad[0])} has action "
                             f"{column[bad[0]]:g}, outside 0..{num_actions - 1}")
    return column.astype(np.int64), discrete_actions


def _parse_flags(table: _LongTable, name: str) -> np.ndarray:
    """(R,) bool values of a 0/1 flag column (also true/false, t/f, yes/no; blank is
    False); a ValueError names the row (file line) of any other value."""
    values = table.columns[name]
    out = np.empty(len(values), bool)
    for i, value in enumerate(values):
        text = str(value).strip().lower()
        if text in ("1", "1.0", "true", "t", "yes"):
            out[i] = True
        elif text in ("0", "0.0", "false", "f", "no", ""):
            out[i] = False
        else:
            raise ValueError(f"column {name!r}: {table.where(i)} has {plain(value)!r}, not a "
                             f"0/1 flag")
    return out


def _pair_successors(table: _LongTable, next_state_columns: Sequence[str], state: np.ndarray,
                     done: np.ndarray, order: np.ndarray,
                     same_agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finds each transition's next state.

    With next-state columns every row is a transition. Otherwise a row's next
    state is the state of the same agent's next row (in `order`); an agent's
    last row has no logged successor and is dropped, and so is a done row,
    whose next row is a reset.

    Args:
      state: (R, D) states of all rows.
      done: (R,) done flags of all rows.
      order: (R,) rows sorted by agent, then time.
      same_agent: (R-1,) whether sorted rows i and i+1 belong to the same agent.

    Returns:
      (rows, next_state): (T,) the table rows that are transitions, in agent
      and time order, and their (T, D) next states.
    """
    if next_state_columns:
        next_state = np.stack([table.numeric(n) for n in next_state_columns], axis=1)
        return order, next_state[order]
    pair = same_agent & ~done[order][:-1]
    rows, next_rows = order[:-1][pair], order[1:][pair]
    return rows, state[next_rows]


def _check_every_agent_has_a_transition(table: _LongTable, agent_column: str, ids: np.ndarray,
                                        rows: np.ndarray, num_agents: int,
                                        agent_keys: tuple | None) -> None:
    """Rejects an agent index in 0..num_agents-1 that none of the (T,) transition
    `rows` belongs to, saying whether it has no rows at all (a gap in the ids) or
    rows but no logged successor. `ids`: (R,) agent index of every table row."""
    present = np.bincount(ids[rows], minlength=num_agents)
    empty = np.flatnonzero(present == 0)
    if not empty.size:
        return
    agent = int(empty[0])
    label = agent if agent_keys is None else agent_keys[agent]
    rows_of_agent = np.flatnonzero(ids == agent)
    why = ("it has no rows; ids must be 0..N-1 without gaps, or pass map_agent_ids=True"
           if rows_of_agent.size == 0 else
           f"it has {rows_of_agent.size} row(s) (first: {table.where(rows_of_agent[0])}) and none "
           f"with a logged successor; a transition needs a row and the agent's next row "
           f"(or next-state columns)")
    raise ValueError(f"column {agent_column!r}: agent {plain(label)!r} has no transitions: "
                     f"{why}")


def save_csv(path: str | os.PathLike, transitions: Transitions) -> None:
    """Writes `transitions` atomically as a long-format CSV with explicit
    next-state columns (`agent_id, time, obs_0.., action.., next_obs_0..,
    reward, done`), which `load_csv` reads back. `time` is the transition's
    index within its agent. Original agent ids (`agent_keys`) are written when
    present."""
    validate_transitions(transitions)
    obs = np.asarray(transitions.obs)
    next_obs = np.asarray(transitions.next_obs)
    action = np.asarray(transitions.action)
    agent_id = np.asarray(transitions.agent_id)
    d = obs.shape[1]
    action_names = (["action"] if transitions.discrete else
                    [f"action_{j}" for j in range(action.shape[1])])
    header = (["agent_id", "time"] + [f"obs_{j}" for j in range(d)] + action_names
              + [f"next_obs_{j}" for j in range(d)] + ["reward", "done"])
    counts = np.zeros(transitions.num_agents, np.int64)
    keys = transitions.agent_keys
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(obs.shape[0]):
            n = agent_id[i]
            acts = [int(action[i])] if transitions.discrete else [repr(float(x)) for x in action[i]]
            writer.writerow([n if keys is None else keys[n], counts[n]]
                            + [repr(float(x)) for x in obs[i]] + acts
                            + [repr(float(x)) for x in next_obs[i]]
                            + [repr(float(transitions.reward[i])), int(transitions.done[i])])
            counts[n] += 1


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False
