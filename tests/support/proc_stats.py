"""What /proc says of a running process: its resident memory and the CPU it has used."""

from __future__ import annotations

import os
import pathlib


def rss_bytes(pid: int) -> int:
    """The process's resident set now (VmRSS); 0 once it is gone."""
    return _status_kib(pid, "VmRSS:") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The largest resident set the process has had (VmHWM); 0 once it is gone."""
    return _status_kib(pid, "VmHWM:") * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process (all its threads) has used; 0.0 once it is gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in status.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def with_children(pid: int) -> list[int]:
    """pid and the processes it started (for `serve --workers N`: the supervisor and
    its workers), as /proc shows them now."""
    pids = [pid]
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the parent's pid
            pids.append(int(entry.name))
    return pids
