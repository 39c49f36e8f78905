"""draft-service configuration: one typed place, flags + SPECMESH_* environment."""
from __future__ import annotations

import dataclasses

from specmesh.services.runtime.model_worker import ModelServiceConfig
from specmesh.services.runtime.service_config import CommonConfig


@dataclasses.dataclass
class DraftConfig(CommonConfig, ModelServiceConfig):
    port: int = 50052
    tree_width: int = dataclasses.field(default=4, metadata={"help": "w: leaves per expansion (timed at start-up)"})
    max_tree: int = dataclasses.field(default=64, metadata={"help": "most tree slots a session may use (the "
                                                                "router's --max-tree must not exceed it); "
                                                                "reported to treekv as KV a session needs"})
    session_idle_s: float = dataclasses.field(default=30.0, metadata={"help": "give a session up (free its KV) "
                                                                            "when the target sent nothing for it "
                                                                            "this long (0 = never); keep it below "
                                                                            "treekv's lease TTL"})
    plan: bool = dataclasses.field(default=True, metadata={"help": "size each greedy subtree by expected tokens "
                                                                   "per second (--no-plan: always the router's "
                                                                   "subtree size)"})
    plain_pause_s: float = dataclasses.field(default=4.0, metadata={"help": "a greedy session the planner sent "
                                                                             "the root alone for 8 rounds in a row "
                                                                             "runs target-only this long (a pause "
                                                                             "the next look confirms lasts twice as "
                                                                             "long, up to 8x), or until the load "
                                                                             "halves; then the draft looks again "
                                                                             "(0 = never pause)"})
    expand_delay_ms: float = dataclasses.field(default=0.0, metadata={"help": "testing: random extra delay per "
                                                                               "expansion, uniform in [0, x] ms"})
