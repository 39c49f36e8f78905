"""target-service configuration: one typed place, flags + SPECMESH_* environment."""
from __future__ import annotations

import dataclasses

from specmesh.services.runtime.model_worker import ModelServiceConfig
from specmesh.services.runtime.service_config import CommonConfig


@dataclasses.dataclass
class TargetConfig(CommonConfig, ModelServiceConfig):
    port: int = 50053
    tp: int = dataclasses.field(default=1, metadata={"help": "tensor-parallel ranks"})
    tensor_port: int = dataclasses.field(default=29500, metadata={"help": "tensor channel rendezvous port (0 = free)"})
    advertise_host: str = dataclasses.field(default="", metadata={"help": "host the draft should dial for the "
                                                                          "tensor channel, and the address its "
                                                                          "rendezvous listens on ('' = --host)"})
    subtree_capacity: int = dataclasses.field(default=64, metadata={"help": "max nodes per subtree"})
    calibrate_tokens: int = dataclasses.field(default=16, metadata={"help": "tree size timed at start-up"})
    borrow_threads: int = dataclasses.field(default=0, metadata={
        "help": "torch threads for steps the draft takes no part in (0 = every core): steps that only "
                "prefill, and every step while the draft follows no session (it paused them all, or there "
                "is none); they may borrow the draft's cores, rounds it takes part in keep --threads"})
    draft_patience_ms: float = dataclasses.field(default=0.0, metadata={
        "help": "how long a session waits for its draft's subtree before it decodes a token alone "
                "(0 = two 1-row forwards as timed at start-up, at least 50 ms)"})
    verify_delay_ms: float = dataclasses.field(default=0.0, metadata={"help": "testing: random extra delay per "
                                                                               "round, uniform in [0, x] ms"})
