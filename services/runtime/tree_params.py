"""The shape of a session's draft tree: how wide it grows, how much of it goes to the target."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequest


@dataclass(frozen=True)
class TreeParams:
    """width: leaves per expansion and children per node (w); subtree_size: nodes per round (bs);
    depth: expansions per round (d); max_tree: forwarded tree slots; max_nodes: all nodes."""

    width: int = 4
    subtree_size: int = 16
    depth: int = 4
    max_tree: int = 64
    max_nodes: int = 512

    def __post_init__(self) -> None:
        for name in ("width", "subtree_size", "depth", "max_tree", "max_nodes"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"tree parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.max_tree < self.width + 1:
            raise InvalidRequest(f"max_tree ({self.max_tree}) must exceed width ({self.width})")
