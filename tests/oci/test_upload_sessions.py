"""Upload sessions: bounded per caller, idle ones cleaned up with their spooled bytes."""

from __future__ import annotations

import time

import pytest

from slipstream.cache_server.services.common import HttpError
from slipstream.cache_server.services.http_oci import (
    MAX_SESSIONS_PER_CALLER,
    UploadSessions,
    close_sessions,
)


def test_an_idle_session_is_cleaned_up_with_its_bytes() -> None:
    sessions = UploadSessions(idle_seconds=0.05)
    idle, _ = sessions.open("team/app", "ci")
    idle.append(b"x" * 200_000)  # spilled to a temporary file
    time.sleep(0.1)
    busy, ended = sessions.open("team/app", "ci")
    assert ended == [idle]
    close_sessions(ended)
    assert idle.spooled.closed
    assert sessions.get(busy.id, "team/app", "ci") is busy
    with pytest.raises(HttpError) as refused:
        sessions.get(idle.id, "team/app", "ci")
    assert refused.value.status == 404 and refused.value.code == "BLOB_UPLOAD_UNKNOWN"


def test_open_ends_the_callers_idle_and_oldest_sessions() -> None:
    sessions = UploadSessions(idle_seconds=0.05)
    first, ended = sessions.open("team/app", "ci")
    assert ended == []
    time.sleep(0.1)
    _, ended = sessions.open("team/app", "ci")
    assert ended == [first]
    sessions = UploadSessions()
    opened = [sessions.open("r", "ci")[0] for _ in range(MAX_SESSIONS_PER_CALLER)]
    other, _ = sessions.open("r", "someone-else")
    _, ended = sessions.open("r", "ci")
    assert ended == [opened[0]]
    assert sessions.get(other.id, "r", "someone-else") is other
