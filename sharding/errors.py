"""The one exception type for problems with a user's data.

Every `DataError` message is one line: what is wrong, where (file, shard,
key, byte offset) and what to do. The CLI prints it as-is and exits nonzero.
"""

from __future__ import annotations


class DataError(Exception):
    """A user-facing data problem (bad input, missing manifest, corrupt shard, ...)."""
