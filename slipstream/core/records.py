"""Limits on record keys: the server stores records, the clients name them."""

from __future__ import annotations

MAX_RECORD_KEY_CHARS = 200
