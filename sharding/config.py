"""The `data` section of the config tree, owned by the sharding package.

Validation errors are `ValueError("field: message")`; the config loader
prefixes them with the section path and the file name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    """One prepared dataset (a directory holding `manifest.json`) and its mixture weight."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: must name a prepared dataset directory")
        if self.weight <= 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """Which shards to stream and how to cut them into samples."""

    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 1024
    num_workers: int = 0
    verify: bool = False
    shuffle: bool = True
    # Attention stays inside each EOS-delimited document of a packed window, and positions
    # restart per document (the batches carry `position_ids`; see `sharding.loader`).
    document_mask: bool = True

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len: must be >= 1, got {self.seq_len}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
