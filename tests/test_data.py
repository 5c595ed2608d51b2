"""The offline data container: construction, validation at the edge, .npz /
CSV / Parquet round trips, long-format semantics, atomic writes."""

from __future__ import annotations

import logging
import os
import stat
import warnings

import numpy as np
import pytest

from persim_jax import data


def _toy(num_agents=3, steps=4, continuous=False, seed=0):
    """A small dataset: agent n has `steps` transitions."""
    rng = np.random.default_rng(seed)
    t = num_agents * steps
    obs = rng.normal(size=(t, 2)).astype(np.float32)
    next_obs = obs + rng.normal(scale=0.1, size=(t, 2)).astype(np.float32)
    action = (rng.normal(size=(t, 2)).astype(np.float32) if continuous
              else rng.integers(0, 3, size=t))
    agent_id = np.repeat(np.arange(num_agents), steps)
    return dict(obs=obs, action=action, next_obs=next_obs, agent_id=agent_id,
                reward=rng.normal(size=t), done=np.arange(t) % steps == steps - 1)


def _assert_same(a: data.Transitions, b: data.Transitions):
    for field in ("obs", "action", "next_obs", "reward", "done", "timeout", "agent_id"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)),
                                      err_msg=field)
    assert (a.num_agents, a.num_actions, a.agent_keys) == (b.num_agents, b.num_actions,
                                                           b.agent_keys)


def test_make_transitions_types_and_properties():
    toy = _toy()
    tr = data.make_transitions(toy["obs"], toy["action"], toy["next_obs"], toy["agent_id"],
                               num_actions=3)
    assert tr.num_transitions == 12 and tr.obs_dim == 2 and tr.num_agents == 3
    assert tr.discrete and tr.action_dim is None and tr.action.dtype == np.int32
    np.testing.assert_array_equal(tr.transitions_per_agent(), [4, 4, 4])
    np.testing.assert_allclose(tr.delta, toy["next_obs"] - toy["obs"])
    cont = data.make_transitions(**{k: v for k, v in _toy(continuous=True).items()})
    assert not cont.discrete and cont.action_dim == 2 and cont.num_actions is None


def test_from_rollouts_flattens_agents_and_drops_invalid_steps():
    obs = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    valid = np.array([[True, True, False], [True, True, True]])
    tr = data.from_rollouts(obs, np.zeros((2, 3), int), obs + 1, valid=valid, num_actions=2)
    np.testing.assert_array_equal(tr.agent_id, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(tr.obs[:, 0], [0, 1, 3, 4, 5])


@pytest.mark.parametrize("continuous", [False, True])
def test_npz_round_trip_with_d4rl_keys(tmp_path, continuous):
    toy = _toy(continuous=continuous)
    tr = data.make_transitions(**toy, covariates=np.array([[1.0], [2.0], [3.0]]),
                               timeout=np.arange(12) == 5)
    path = tmp_path / "dataset.npz"
    data.save_npz(path, tr)
    with np.load(path) as file:
        for key in ("observations", "actions", "next_observations", "rewards", "terminals",
                    "timeouts", "agent_ids"):
            assert key in file.files
    back = data.load_npz(path)
    _assert_same(tr, back)
    np.testing.assert_array_equal(back.covariates, tr.covariates)
    assert list(os.listdir(tmp_path)) == ["dataset.npz"]   # no temporary files left


def test_load_npz_reads_a_plain_d4rl_style_file(tmp_path):
    toy = _toy()
    path = tmp_path / "plain.npz"
    np.savez(path, observations=toy["obs"], actions=toy["action"],
             next_observations=toy["next_obs"], agent_ids=toy["agent_id"])
    tr = data.load_npz(path)
    assert tr.num_agents == 3 and tr.num_actions == int(toy["action"].max()) + 1
    np.testing.assert_array_equal(tr.reward, np.zeros(12))


def test_load_npz_names_a_missing_key(tmp_path):
    toy = _toy()
    path = tmp_path / "broken.npz"
    np.savez(path, observations=toy["obs"], actions=toy["action"], agent_ids=toy["agent_id"])
    with pytest.raises(ValueError, match="next_observations"):
        data.load_npz(path)


def test_interrupted_save_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    tr = data.make_transitions(**_toy())
    path = tmp_path / "dataset.npz"

    def half_write(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", half_write)
    with pytest.raises(KeyboardInterrupt):
        data.save_npz(path, tr)
    assert os.listdir(tmp_path) == []

    monkeypatch.undo()
    data.save_npz(path, tr)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", half_write)
    with pytest.raises(KeyboardInterrupt):
        data.save_npz(path, data.make_transitions(**_toy(seed=1)))
    assert os.listdir(tmp_path) == ["dataset.npz"] and path.read_bytes() == before


# ---------------------------------------------------------------------------
# Validation: each error names the field and the row


def _bad(**changes):
    toy = _toy()
    toy.update(changes)
    return toy


BAD_CASES = [
    ("mismatched lengths", dict(next_obs=np.zeros((11, 2))), ["next_obs", "(12, 2)"]),
    ("wrong state dims", dict(obs=np.zeros(12)), ["obs", "(T, D)"]),
    ("NaN state", dict(obs=np.where(np.arange(12)[:, None] == 3, np.nan, _toy()["obs"])),
     ["obs", "row 3", "nan"]),
    ("inf next state", dict(next_obs=np.where(np.arange(12)[:, None] == 7, np.inf,
                                              _toy()["next_obs"])), ["next_obs", "row 7"]),
    ("NaN reward", dict(reward=np.where(np.arange(12) == 2, np.nan, 0.0)), ["reward", "row 2"]),
    ("reward length", dict(reward=np.zeros(5)), ["reward", "(12,)"]),
    ("agent id too large", dict(agent_id=np.where(np.arange(12) == 6, 5, _toy()["agent_id"]),
                                num_agents=3), ["agent_id", "row 6", "0..2"]),
    ("negative agent id", dict(agent_id=np.where(np.arange(12) == 1, -1, _toy()["agent_id"])),
     ["agent_id", "row 1"]),
    ("agent without transitions", dict(agent_id=np.repeat([0, 2, 3], 4)),
     ["agent_id", "agent 1", "no transitions"]),
    ("non-integer agent ids", dict(agent_id=np.repeat([0.5, 1.0, 2.0], 4)),
     ["agent_id", "map_agent_ids"]),
    ("discrete action out of range", dict(action=np.where(np.arange(12) == 9, 3, 0),
                                          num_actions=3), ["action", "row 9", "0..2"]),
    ("negative action", dict(action=np.where(np.arange(12) == 4, -1, 0)), ["action", "row 4"]),
    ("NaN continuous action", dict(action=np.where(np.arange(12)[:, None] == 8, np.nan,
                                                   np.zeros((12, 2)))), ["action", "row 8"]),
    ("covariates of wrong length", dict(covariates=np.zeros((2, 1))), ["covariates", "N = 3"]),
]


@pytest.mark.parametrize("name,changes,words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_validation_errors_name_the_field_and_row(name, changes, words):
    with pytest.raises(ValueError) as error:
        data.make_transitions(**_bad(**changes))
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_arbitrary_agent_ids_are_mapped_kept_and_reported(caplog):
    toy = _toy()
    toy["agent_id"] = np.repeat([30, 10, 20], 4)
    with caplog.at_level(logging.INFO, logger="persim_jax.data"):
        tr = data.make_transitions(**toy, map_agent_ids=True)
    assert tr.agent_keys == (10, 20, 30)
    np.testing.assert_array_equal(tr.agent_id, np.repeat([2, 0, 1], 4))
    assert "10" in caplog.text and "30" in caplog.text
    with pytest.raises(ValueError, match="agent 0 has no transitions.*map_agent_ids"):
        data.make_transitions(**toy)   # unmapped, agents 0..9 etc. would be empty


# ---------------------------------------------------------------------------
# Long format: CSV and Parquet


def _write(path, text):
    path.write_text(text)
    return path


LONG_CSV = """agent_id,time,obs_x,obs_v,action,reward
1,1,10.0,0.5,2,-1
0,0,0.0,0.0,1,-1
0,2,2.0,0.2,0,-1
0,1,1.0,0.1,1,-1
1,0,9.0,0.4,0,-1
1,2,11.0,0.6,1,-1
"""


def test_csv_long_format_pairs_consecutive_rows_of_each_agent(tmp_path):
    tr = data.load_csv(_write(tmp_path / "log.csv", LONG_CSV))
    # Rows are sorted by (agent, time); each agent's last row has no successor.
    np.testing.assert_array_equal(tr.agent_id, [0, 0, 1, 1])
    np.testing.assert_allclose(tr.obs, [[0, 0], [1, 0.1], [9, 0.4], [10, 0.5]])
    np.testing.assert_allclose(tr.next_obs, [[1, 0.1], [2, 0.2], [10, 0.5], [11, 0.6]])
    np.testing.assert_array_equal(tr.action, [1, 1, 0, 2])
    assert tr.num_actions == 3 and tr.num_agents == 2


def test_csv_done_row_followed_by_a_reset_is_dropped(tmp_path):
    text = ("agent_id,time,obs_0,action,done\n"
            "0,0,0.0,1,0\n0,1,1.0,1,1\n0,2,-5.0,0,0\n0,3,-4.0,1,0\n")
    tr = data.load_csv(_write(tmp_path / "log.csv", text))
    # 0->1 is kept; 1 (done) -> -5 is a reset, dropped; -5 -> -4 kept.
    np.testing.assert_allclose(tr.obs[:, 0], [0.0, -5.0])
    np.testing.assert_allclose(tr.next_obs[:, 0], [1.0, -4.0])


def test_csv_explicit_columns_and_continuous_actions(tmp_path):
    text = ("patient,day,hr,bp,dose,next_hr,next_bp\n"
            "p1,0,60,120,0.5,61,119\np2,0,70,130,1.5,71,128\n")
    tr = data.load_csv(_write(tmp_path / "log.csv", text), agent_column="patient",
                       time_column="day", state_columns=["hr", "bp"], action_columns=["dose"],
                       next_state_columns=["next_hr", "next_bp"], discrete_actions=False,
                       map_agent_ids=True)
    assert tr.agent_keys == ("p1", "p2") and tr.action_dim == 1
    np.testing.assert_allclose(tr.next_obs, [[61, 119], [71, 128]])
    np.testing.assert_allclose(tr.action, [[0.5], [1.5]])


def test_csv_round_trip(tmp_path, mountaincar_data):
    transitions, _ = mountaincar_data
    small = transitions.select(np.asarray(transitions.agent_id) < 4)
    small = data.make_transitions(small.obs, small.action, small.next_obs, small.agent_id,
                                  reward=small.reward, done=small.done, num_actions=3)
    path = tmp_path / "mc.csv"
    data.save_csv(path, small)
    back = data.load_csv(path, num_actions=3)
    _assert_same(small, back)


CSV_ERRORS = [
    ("NaN cell", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,nan,1\n",
     {}, ["obs_0", "line 3"]),
    ("empty cell", "agent_id,time,obs_0,action\n0,0,,1\n0,1,1.0,1\n", {}, ["obs_0", "line 2"]),
    ("text in a number", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,fast,1\n",
     {}, ["obs_0", "line 3", "fast"]),
    ("single-row agent", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,1.0,1\n1,0,5.0,1\n",
     {}, ["agent 1", "no transitions"]),
    ("gap in agent ids", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,1.0,1\n2,0,5.0,1\n2,1,6,1\n",
     {}, ["agent 1", "map_agent_ids"]),
    ("string ids", "agent_id,time,obs_0,action\nbob,0,0.0,1\nbob,1,1.0,1\n",
     {}, ["agent_id", "line 2", "map_agent_ids"]),
    ("duplicate time", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,0,1.0,1\n",
     {}, ["time", "line 2", "line 3"]),
    ("action out of range", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,1.0,4\n",
     {"num_actions": 3}, ["action", "line 3", "0..2"]),
    ("fractional discrete action", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,1.0,0.5\n",
     {"discrete_actions": True}, ["action", "line 3"]),
    ("missing time column", "agent_id,obs_0,action\n0,0.0,1\n0,1.0,1\n", {},
     ["time_column", "time_column=None"]),
    ("no state columns", "agent_id,time,x,action\n0,0,0.0,1\n0,1,1.0,1\n", {},
     ["state_columns", "obs_"]),
    ("ragged line", "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,1.0\n", {}, ["line 3"]),
]


@pytest.mark.parametrize("name,text,options,words", CSV_ERRORS, ids=[c[0] for c in CSV_ERRORS])
def test_csv_errors_name_the_column_and_line(tmp_path, name, text, options, words):
    with pytest.raises(ValueError) as error:
        data.load_csv(_write(tmp_path / "bad.csv", text), **options)
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_csv_string_ids_mapped_in_sorted_order(tmp_path):
    text = ("agent_id,time,obs_0,action\nbob,0,0.0,1\nbob,1,1.0,1\n"
            "alice,0,5.0,0\nalice,1,6.0,0\n")
    tr = data.load_csv(_write(tmp_path / "log.csv", text), map_agent_ids=True)
    assert tr.agent_keys == ("alice", "bob")
    np.testing.assert_allclose(tr.obs[:, 0], [5.0, 0.0])


def test_csv_without_time_column_uses_file_order(tmp_path):
    text = "agent_id,obs_0,action\n0,3.0,1\n0,1.0,1\n0,2.0,1\n"
    tr = data.load_csv(_write(tmp_path / "log.csv", text), time_column=None)
    np.testing.assert_allclose(tr.obs[:, 0], [3.0, 1.0])
    np.testing.assert_allclose(tr.next_obs[:, 0], [1.0, 2.0])


def test_parquet_long_format(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (optional) is needed for Parquet")
    import pyarrow.parquet as pq

    table = pa.table({
        "agent_id": ["m7", "m7", "m7", "m2", "m2"],
        "time": [2, 0, 1, 0, 1],
        "obs_temp": [3.0, 1.0, 2.0, 10.0, 11.0],
        "action_power": [0.1, 0.2, 0.3, 0.4, 0.5],
        "action_fan": [1.0, 0.0, 1.0, 0.0, 1.0],
    })
    path = tmp_path / "machines.parquet"
    pq.write_table(table, path)
    tr = data.load_parquet(path, map_agent_ids=True)
    assert tr.agent_keys == ("m2", "m7") and tr.action_dim == 2
    np.testing.assert_allclose(tr.obs[:, 0], [10.0, 1.0, 2.0])
    np.testing.assert_allclose(tr.next_obs[:, 0], [11.0, 2.0, 3.0])
    np.testing.assert_allclose(tr.action, [[0.4, 0.0], [0.2, 0.0], [0.3, 1.0]])

    table = table.set_column(2, "obs_temp", pa.array([3.0, 1.0, float("nan"), 10.0, 11.0]))
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="obs_temp.*row 2"):
        data.load_parquet(path, map_agent_ids=True)


# ---------------------------------------------------------------------------
# Own data as users bring it: covariate columns, scale checks, hold-out, modes

COVARIATE_CSV = """patient,step,obs_level,obs_meal,action_dose,cov_age,cov_weight
b#2,0,100.0,0.0,0.5,41,70.5
a#1,1,101.0,0.0,0.1,30,60.0
a#1,0,99.0,40.0,0.2,30,60.0
b#2,1,98.0,0.0,0.4,41,70.5
a#1,2,102.0,0.0,0.3,30,60.0
"""


def test_csv_covariate_columns_one_value_per_agent(tmp_path):
    tr = data.load_csv(_write(tmp_path / "log.csv", COVARIATE_CSV), agent_column="patient",
                       time_column="step", action_prefix="action_", map_agent_ids=True)
    assert tr.agent_keys == ("a#1", "b#2")
    assert tr.state_names == ("obs_level", "obs_meal")
    assert tr.covariate_names == ("cov_age", "cov_weight")
    np.testing.assert_allclose(tr.covariates, [[30, 60.0], [41, 70.5]])
    assert not tr.discrete and tr.action_dim == 1          # covariates are not actions
    varying = COVARIATE_CSV.replace("b#2,1,98.0,0.0,0.4,41,70.5", "b#2,1,98.0,0.0,0.4,42,70.5")
    with pytest.raises(ValueError) as error:
        data.load_csv(_write(tmp_path / "bad.csv", varying), agent_column="patient",
                      time_column="step", action_prefix="action_", map_agent_ids=True)
    message = str(error.value)
    for word in ("cov_age", "'b#2'", "41 at", "line 2", "42 at", "line 5"):
        assert word in message, (word, message)
    none = data.load_csv(tmp_path / "log.csv", agent_column="patient", time_column="step",
                         action_prefix="action_", map_agent_ids=True, covariate_prefix=None,
                         state_columns=["obs_level"])
    assert none.covariates is None and none.covariate_names is None


def test_column_scale_ignores_zeros_and_a_few_wild_values():
    meals = np.zeros(200)
    meals[::20] = np.linspace(20, 80, 10)                # mostly zero, meals of 20..80 g
    assert 40 < data.column_scale(meals) < 60
    data.check_column_values("obs_meal", meals, str)     # real meals pass
    meals[7] = 1e30
    with pytest.raises(ValueError, match=r"'obs_meal': 7 has 1e\+30.*allow_outliers"):
        data.check_column_values("obs_meal", meals, str)
    data.check_column_values("obs_meal", meals, str, allow_outliers=True)
    meals[7] = -1e39                                     # float32 cannot hold it: always an error
    with pytest.raises(ValueError, match="float32"):
        data.check_column_values("obs_meal", meals, str, allow_outliers=True)
    assert data.column_scale(np.zeros(5)) == 0.0
    data.check_column_values("constant", np.zeros(5), str)


def test_npz_outliers_and_names(tmp_path):
    toy = _toy()
    tr = data.make_transitions(**toy, covariates=np.ones((3, 1)), state_names=["x", "v"],
                               covariate_names=["mass"])
    data.save_npz(tmp_path / "ok.npz", tr)
    back = data.load_npz(tmp_path / "ok.npz")
    assert back.state_names == ("x", "v") and back.covariate_names == ("mass",)
    obs = toy["obs"].astype(np.float64)
    obs[4, 1] = 1e30
    np.savez(tmp_path / "wild.npz", observations=obs, actions=toy["action"],
             next_observations=toy["next_obs"], agent_ids=toy["agent_id"])
    with pytest.raises(ValueError, match=r"observations\[:, 1\].*row 4"):
        data.load_npz(tmp_path / "wild.npz")
    assert data.load_npz(tmp_path / "wild.npz", allow_outliers=True).num_transitions == 12
    obs[4, 1] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no numpy overflow warning
        with pytest.raises(ValueError, match="row 4, column 1 is 1e\\+39.*float32"):
            data.make_transitions(obs, toy["action"], toy["next_obs"], toy["agent_id"])


def test_messages_show_plain_values(tmp_path):
    text = "agent_id,time,obs_0,action\n0,0,0.0,1\n0,1,1.0,0.25\n"
    with pytest.raises(ValueError) as error:
        data.load_csv(_write(tmp_path / "a.csv", text), discrete_actions=True)
    assert "has 0.25, not an integer action" in str(error.value)
    assert "np." not in str(error.value)
    with pytest.raises(ValueError) as error:
        data.make_transitions(np.zeros((2, 1)), np.array([0.0, 0.5]), np.zeros((2, 1)),
                              np.zeros(2, int), num_actions=2)
    assert "has 0.5" in str(error.value) and "np." not in str(error.value)


def test_time_ordered_split_holds_out_each_agents_end():
    agent_id = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 2)
    rng = np.random.default_rng(0)
    order = rng.permutation(agent_id.size)          # agents interleaved, time order kept
    order = np.concatenate([np.sort(order[agent_id[order] == a]) for a in range(4)])
    tr = data.make_transitions(np.zeros((16, 1)), np.zeros(16, int), np.zeros((16, 1)),
                               agent_id[np.argsort(order)], num_actions=1)
    train_index, held_out = data.time_ordered_split(tr, 0.2)
    ids = np.asarray(tr.agent_id)
    for agent, expected in ((0, 2), (1, 1), (2, 0), (3, 1)):
        rows = np.flatnonzero(ids == agent)
        assert list(held_out[ids[held_out] == agent]) == list(rows[len(rows) - expected:])
    assert sorted([*train_index, *held_out]) == list(range(16))
    with pytest.raises(ValueError, match="held_out_fraction"):
        data.time_ordered_split(tr, 1.0)


def test_atomic_write_gives_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        with data.atomic_write(tmp_path / "a.bin") as handle:
            handle.write(b"x")
        os.umask(0o002)
        with data.atomic_write(tmp_path / "b.txt", "w") as handle:
            handle.write("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o664


def test_msgpack_files_round_trip_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "thing.msgpack"
    data.save_msgpack(path, {"format": "kind-a", "weights": np.arange(3.0)})
    loaded = data.load_msgpack(path, "kind-a", "a kind-a file")
    np.testing.assert_array_equal(loaded["weights"], np.arange(3.0))
    with pytest.raises(ValueError, match="thing.msgpack: not a kind-b file"):
        data.load_msgpack(path, "kind-b", "a kind-b file")
    (tmp_path / "notes.txt").write_text("not msgpack at all")
    with pytest.raises(ValueError, match="notes.txt: not a kind-a file"):
        data.load_msgpack(tmp_path / "notes.txt", "kind-a", "a kind-a file")


def test_a_damaged_msgpack_file_of_ours_is_named_in_one_error(tmp_path):
    path = tmp_path / "simulator_trial0.msgpack"
    data.save_msgpack(path, {"format": "kind-a", "weights": np.arange(300.0)})
    whole = path.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 1, 20):
        path.write_bytes(whole[:cut])        # a copy or a write cut short
        with pytest.raises(ValueError) as error:
            data.load_msgpack(path, "kind-a", "a kind-a file")
        assert str(error.value) == (f"{path}: damaged kind-a file (incomplete input); delete it "
                                    f"to rebuild")
        assert error.value.__cause__ is None and error.value.__suppress_context__
    path.write_bytes(whole[:20] + b"\xc1" * 50)       # overwritten after its first bytes
    with pytest.raises(ValueError, match=r"simulator_trial0.msgpack: damaged kind-a file \("):
        data.load_msgpack(path, "kind-a", "a kind-a file")
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a kind-a file \(damaged or foreign: empty file\)"):
        data.load_msgpack(path, "kind-a", "a kind-a file")
    path.write_bytes(whole)
    np.testing.assert_array_equal(data.load_msgpack(path, "kind-a", "a kind-a file")["weights"],
                                  np.arange(300.0))


def test_jsonable_turns_numpy_values_and_tuples_into_json_types():
    value = {"a": np.float32(0.1), "b": (1, np.int64(2), [np.bool_(True), None]),
             "c": np.arange(4).reshape(2, 2), "d": {"e": "text", "f": np.str_("g")},
             "h": np.array([(1, 2)], dtype=object)}
    out = data.jsonable(value)
    assert out == {"a": float(np.float32(0.1)), "b": [1, 2, [True, None]],
                   "c": [[0, 1], [2, 3]], "d": {"e": "text", "f": "g"}, "h": [[1, 2]]}
    assert type(out["a"]) is float and type(out["b"][1]) is int and type(out["d"]["f"]) is str
    with pytest.raises(TypeError, match="not JSON serialisable: set"):
        data.jsonable({"x": [{1, 2}]})


def test_write_json_writes_what_the_experiments_have_always_written(tmp_path):
    import json

    payload = {"returns": np.array([[1.5, np.float32(2.25)]]), "seed": np.int64(3),
               "sizes": (4, 5), "loss": np.float64(0.1), "nested": [{"k": (np.float32(0.2),)}],
               "name": "cartpole", "none": None}

    def experiments_default(value):      # experiments/run.py's `_json_default`, as it was
        if isinstance(value, (np.floating, np.integer)):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, tuple):
            return list(value)
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    path = tmp_path / "sub" / "results.json"
    data.write_json(path, payload)
    expected = json.dumps(payload, indent=1, default=experiments_default) + "\n"
    assert path.read_text() == expected
    assert json.loads(expected) == data.jsonable(payload)
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        data.write_json(tmp_path / "bad.json", {"x": object()})
    assert sorted(os.listdir(tmp_path)) == ["sub"]
