"""Errors every part may raise for the entry points to report."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the command line or a setting: reported as one line, exit code 2."""
