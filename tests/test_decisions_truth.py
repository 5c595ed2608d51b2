"""Decisions where the truth is known (issue 26): a paper dataset exported to
CSV and decided on with the example reward and policies
(`benchmarks.own_data_decisions`, tiny). Its own file, so that the test
runners schedule it apart from tests/test_decisions.py."""

from __future__ import annotations


def test_exported_cartpole_decisions_rank_policies_as_the_true_env(tmp_path):
    from benchmarks.own_data_decisions import run_benchmark

    record = run_benchmark("cartpole", "pure", work_dir=str(tmp_path), overrides=dict(
        num_agents=40, epochs=15, candidates=64, ensemble_size=2, state_hidden=(32,),
        action_hidden=(32,)), horizon=60, starts=2, episodes=1)
    # (a) balancing outlasts pushing left, in the true physics and in the
    # simulators of at least 4 of the 5 test agents.
    for row in record["ranking"]:
        assert row["true"]["balance"] > row["true"]["push_left"]
    assert record["same_order"] >= 4, record["ranking"]
    # (b) the user's reward plans exactly as the env's.
    assert record["episodes"]["per_agent"]["user_reward"] == \
        record["episodes"]["per_agent"]["env_reward"]
