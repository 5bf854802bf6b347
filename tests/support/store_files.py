"""What a disk store directory holds, walked without the store's code: the figures its
index must count."""

from __future__ import annotations

import os
import pathlib

from slipstream.cache_server.storage.disk_index import space_taken


def counted_space(root: pathlib.Path) -> tuple[int, int]:
    """(entries, bytes) the store should count for the files under root: each file's
    space_taken."""
    block = os.statvfs(root).f_frsize
    files = [p for kind in ("cas", "records") for p in (root / kind).rglob("*") if p.is_file()]
    return len(files), sum(space_taken(p.stat().st_size, block) for p in files)
