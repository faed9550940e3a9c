"""The launcher's user-facing error: one line, what is wrong, where, and what to do.

Its own module so every launcher module can import it at the top without importing
each other (`launcher.cli` turns it into `gptrain CMD: error: ...` and exit 2).
"""

from __future__ import annotations


class LaunchError(Exception):
    """A launch (or prepare job) that cannot start, or whose ranks failed; one line for the
    user (a failed launch adds one line per further distinct rank error)."""


class StatusError(Exception):
    """A run directory that cannot be inspected or cancelled; one line for the user."""
