"""Shard index and total from CI variables, minding which are 1-based."""

from __future__ import annotations

import pytest

from slipstream.splitter.ci import check_shard, run_id_from_env, shard_from_env


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"CIRCLE_NODE_INDEX": "0", "CIRCLE_NODE_TOTAL": "4"}, (0, 4)),
        ({"CI_NODE_INDEX": "1", "CI_NODE_TOTAL": "3"}, (0, 3)),  # GitLab counts from 1
        ({"CI_NODE_INDEX": "3", "CI_NODE_TOTAL": "3"}, (2, 3)),
        ({"BUILDKITE_PARALLEL_JOB": "5", "BUILDKITE_PARALLEL_JOB_COUNT": "6"}, (5, 6)),
        ({"CIRCLE_NODE_INDEX": "1"}, None),  # half a pair is not a setting
    ],
)
def test_shard_from_env(env, expected):
    assert shard_from_env(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"CI_NODE_INDEX": "0", "CI_NODE_TOTAL": "3"},  # 0 is not a GitLab index
        {"CIRCLE_NODE_INDEX": "4", "CIRCLE_NODE_TOTAL": "4"},
        {"CIRCLE_NODE_INDEX": "x", "CIRCLE_NODE_TOTAL": "4"},
        {"BUILDKITE_PARALLEL_JOB": "0", "BUILDKITE_PARALLEL_JOB_COUNT": "0"},
    ],
)
def test_bad_ci_values_are_errors_naming_the_variable(env):
    with pytest.raises(ValueError) as info:
        shard_from_env(env)
    assert next(iter(env)) in str(info.value)


def test_check_shard():
    check_shard(0, 1)
    with pytest.raises(ValueError):
        check_shard(-1, 2)
    with pytest.raises(ValueError):
        check_shard(0, 0)


def test_run_id_is_shared_by_the_shards_of_one_run():
    a = {"GITHUB_RUN_ID": "9", "GITHUB_RUN_ATTEMPT": "1", "GITHUB_JOB": "test"}
    assert run_id_from_env(a) == run_id_from_env(dict(a))
    assert run_id_from_env(a) != run_id_from_env({**a, "GITHUB_RUN_ATTEMPT": "2"})
    assert run_id_from_env({"CI_PIPELINE_ID": "7", "CI_JOB_NAME": "t 1/2"}) == run_id_from_env(
        {"CI_PIPELINE_ID": "7", "CI_JOB_NAME": "t 2/2"}
    )
    assert run_id_from_env({}) is None
