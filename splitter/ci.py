"""The shard index and total, and a run id, from CI systems' own variables."""

from __future__ import annotations

from collections.abc import Mapping

# (index variable, total variable, the index's base)
_CI_SHARD_VARIABLES = (
    ("CIRCLE_NODE_INDEX", "CIRCLE_NODE_TOTAL", 0),  # CircleCI
    ("CI_NODE_INDEX", "CI_NODE_TOTAL", 1),  # GitLab CI parallel:
    ("BUILDKITE_PARALLEL_JOB", "BUILDKITE_PARALLEL_JOB_COUNT", 0),  # Buildkite
)
# Ids shared by all shards of one run, so their uploads merge into one run.
# The first variable names the CI; the others narrow it (a retry is a new run).
# GitLab's job name differs per parallel job ("test 1/4"), so only the pipeline counts.
_CI_RUN_VARIABLES = (
    ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "GITHUB_JOB"),
    ("CIRCLE_WORKFLOW_ID", "CIRCLE_JOB"),
    ("CI_PIPELINE_ID",),
    ("BUILDKITE_BUILD_ID", "BUILDKITE_STEP_ID"),
)


def check_shard(index: int, total: int) -> None:
    """Raise ValueError unless 0 <= index < total."""
    if total < 1:
        raise ValueError(f"the shard total must be at least 1, not {total}")
    if not 0 <= index < total:
        raise ValueError(f"the shard index must be from 0 to {total - 1}, not {index}")


def shard_from_env(env: Mapping[str, str]) -> tuple[int, int] | None:
    """The 0-based (index, total) from CircleCI, GitLab or Buildkite variables, if set.

    Raises ValueError when the variables are set but not valid.
    """
    for index_var, total_var, base in _CI_SHARD_VARIABLES:
        raw_index, raw_total = env.get(index_var), env.get(total_var)
        if raw_index is None or raw_total is None:
            continue
        try:
            index, total = int(raw_index) - base, int(raw_total)
        except ValueError:
            raise ValueError(
                f"{index_var}={raw_index!r} / {total_var}={raw_total!r} are not numbers"
            ) from None
        try:
            check_shard(index, total)
        except ValueError as exc:
            raise ValueError(f"{index_var}={raw_index} / {total_var}={raw_total}: {exc}") from None
        return index, total
    return None


def resolve_shard(index: int | None, total: int | None, env: Mapping[str, str]) -> tuple[int, int]:
    """(index, total) from flags, else from the CI's variables; ValueError if neither."""
    if index is None and total is None:
        found = shard_from_env(env)
        if found is None:
            raise ValueError("give --index and --total (no CI shard variables are set)")
        return found
    if index is None or total is None:
        raise ValueError("give both --index and --total")
    check_shard(index, total)
    return index, total


def run_id_from_env(env: Mapping[str, str]) -> str | None:
    """An id every shard of this CI run shares, or None outside CI."""
    for variables in _CI_RUN_VARIABLES:
        if env.get(variables[0]):
            return " ".join(f"{v}={env[v]}" for v in variables if env.get(v))
    return None
