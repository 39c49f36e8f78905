"""treekv-service configuration: flags `--draft-blocks` etc., env `SPECMESH_DRAFT_BLOCKS` etc."""
from __future__ import annotations

import dataclasses

from ..runtime.service_config import CommonConfig


@dataclasses.dataclass
class TreekvConfig(CommonConfig):
    """The ledger's view of the mesh's KV memory.

    The pool sizes here must match the draft / target services' own pools (same block count and
    block size): treekv grants ranges, the model services claim exactly those ranges in their tensors.
    """

    port: int = dataclasses.field(default=50054, metadata={"help": "gRPC port (0 = a free port)"})
    draft_blocks: int = dataclasses.field(default=1024, metadata={"help": "blocks in the draft KV pool"})
    target_blocks: int = dataclasses.field(default=1024, metadata={"help": "blocks in the target KV pool"})
    block_size: int = dataclasses.field(default=16, metadata={"help": "KV slots (tokens) per block, both pools"})
    state_file: str = dataclasses.field(default="", metadata={"help": "keep the granted leases in this file and "
                                                                      "restore them on start (a restarted treekv "
                                                                      "then never leases a block twice); '' = off"})
    lease_ttl_s: float = dataclasses.field(default=60.0, metadata={"help": "a session's blocks are freed this long "
                                                                           "after its router last renewed them; "
                                                                           "must exceed the draft's "
                                                                           "session idle limit"})

    def validate(self) -> None:
        """Reject sizes the ledger cannot work with (ValueError with the flag name)."""
        for name in ("draft_blocks", "target_blocks", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lease_ttl_s <= 0:
            raise ValueError(f"--lease-ttl-s must be positive, got {self.lease_ttl_s}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"--shutdown-grace-s must be >= 0, got {self.shutdown_grace_s}")
