"""treekv-service configuration: flags `--lease-ttl-s` etc., env `SPECMESH_LEASE_TTL_S` etc."""
from __future__ import annotations

import dataclasses

from ..runtime.service_config import CommonConfig


@dataclasses.dataclass
class TreekvConfig(CommonConfig):
    """treekv's settings. Pool sizes are not among them: each model service reports its own pool
    (configured once, on that service) and the router registers it here."""

    port: int = dataclasses.field(default=50054, metadata={"help": "gRPC port (0 = a free port)"})
    prefix_cache: bool = dataclasses.field(default=True, metadata={"help": "index what the pools cache and hint "
                                                                          "new sessions to copy shared prefixes "
                                                                          "(false: every prompt is prefilled)"})
    state_file: str = dataclasses.field(default="", metadata={"help": "keep the granted leases in this file and "
                                                                      "restore them on start (a restarted treekv "
                                                                      "then never leases a block twice); '' = off"})
    lease_ttl_s: float = dataclasses.field(default=60.0, metadata={"help": "a session's blocks are freed this long "
                                                                           "after its router last renewed them; "
                                                                           "must exceed the draft's "
                                                                           "session idle limit"})

    def validate(self) -> None:
        """Reject sizes the ledger cannot work with (ValueError with the flag name)."""
        if self.lease_ttl_s <= 0:
            raise ValueError(f"--lease-ttl-s must be positive, got {self.lease_ttl_s}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"--shutdown-grace-s must be >= 0, got {self.shutdown_grace_s}")
