"""router configuration: flags `--draft-addr` etc., env `SPECMESH_DRAFT_ADDR` etc."""
from __future__ import annotations

import dataclasses

from ..runtime.service_config import CommonConfig


@dataclasses.dataclass
class RouterConfig(CommonConfig):
    """The public face: where the mesh lives, request limits, and the tree shape it asks the draft for."""

    port: int = dataclasses.field(default=50051, metadata={"help": "public gRPC port (0 = a free port)"})
    http_port: int = dataclasses.field(default=8000, metadata={"help": "OpenAI-style HTTP port (-1 = off, "
                                                                       "0 = a free port)"})
    draft_addr: str = dataclasses.field(default="127.0.0.1:50052", metadata={"help": "draft-service host:port, or "
                                                                                    "a comma-separated list: draft i "
                                                                                    "pairs with target i ('' = no "
                                                                                    "draft: target only)"})
    target_addr: str = dataclasses.field(default="127.0.0.1:50053", metadata={"help": "target-service host:port, or "
                                                                                      "a comma-separated list (one "
                                                                                      "per pair)"})
    treekv_addr: str = dataclasses.field(default="127.0.0.1:50054", metadata={"help": "treekv-service host:port"})
    model: str = dataclasses.field(default="", metadata={"help": "target model (directory or .gguf; '' = the "
                                                                 "default pair) for the tokenizer and chat template"})
    draft_model: str = dataclasses.field(default="", metadata={"help": "draft model name shown by ModelInfo "
                                                                       "('' = the default draft's name when --model "
                                                                       "is the default pair)"})
    max_context: int = dataclasses.field(default=4096, metadata={"help": "prompt + max_tokens limit (clamped to "
                                                                         "the model's max positions)"})
    tree_width: int = dataclasses.field(default=4, metadata={"help": "w: leaves per draft expansion"})
    subtree_size: int = dataclasses.field(default=16, metadata={"help": "bs: tree nodes verified per round"})
    depth: int = dataclasses.field(default=0, metadata={"help": "d: draft expansions per round (0 = auto: target "
                                                                "forward ms / draft forward ms)"})
    max_tree: int = dataclasses.field(default=64, metadata={"help": "draft tree slots beyond the prefix"})
    api_key_file: str = dataclasses.field(default="", metadata={"help": "file of API keys, one per line: the "
                                                                         "public gRPC and HTTP endpoints then "
                                                                         "require 'authorization: Bearer <key>' "
                                                                         "('' = env SPECMESH_API_KEY, else open)"})
    served_model_names: str = dataclasses.field(default="", metadata={"help": "comma-separated names the HTTP "
                                                                              "API also accepts as `model` (the "
                                                                              "target's own name always works)"})
    default_max_tokens: int = dataclasses.field(default=1024, metadata={"help": "max_tokens of a chat request "
                                                                                "that sets none (0 = the rest of "
                                                                                "the context, reserving KV for all "
                                                                                "of it)"})
    max_stop_strings: int = dataclasses.field(default=16, metadata={"help": "stop strings per request"})
    max_stop_len: int = dataclasses.field(default=256, metadata={"help": "characters per stop string"})
    max_concurrent: int = dataclasses.field(default=64, metadata={"help": "requests in flight; more are refused "
                                                                          "with RESOURCE_EXHAUSTED (HTTP 429)"})
    rpc_timeout_s: float = dataclasses.field(default=10.0, metadata={"help": "deadline of unary calls to the "
                                                                             "mesh services"})
    lease_renew_s: float = dataclasses.field(default=5.0, metadata={"help": "how often the treekv leases of live "
                                                                           "sessions are renewed (well below "
                                                                           "treekv's lease TTL)"})

    def pairs(self) -> list[tuple[str, str]]:
        """The draft/target pairs as (target address, draft address; '' = none): target i with draft i.

        A pair's id is its target address as written here, so every router given the same list
        names the pairs alike (treekv places sessions by these ids)."""
        targets = [a.strip() for a in self.target_addr.split(",")]
        drafts = [a.strip() for a in self.draft_addr.split(",")] if self.draft_addr.strip() else [""] * len(targets)
        if not all(targets):
            raise ValueError(f"--target-addr needs one host:port per pair, got {self.target_addr!r}")
        if len(drafts) != len(targets):
            raise ValueError(f"--draft-addr lists {len(drafts)} drafts for {len(targets)} targets in --target-addr "
                             f"(draft i pairs with target i; '' = no drafts)")
        for name, addrs in (("--target-addr", targets), ("--draft-addr", [d for d in drafts if d])):
            repeated = sorted({a for a in addrs if addrs.count(a) > 1})
            if repeated:
                raise ValueError(f"{name} names {repeated[0]} twice (each service belongs to one pair)")
        return list(zip(targets, drafts))

    def validate(self) -> None:
        """Reject settings the router cannot work with (ValueError naming the flag)."""
        positive = ("max_context", "tree_width", "subtree_size", "max_tree", "max_concurrent", "max_stop_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("depth", "max_stop_strings", "default_max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.http_port < -1:
            raise ValueError(f"--http-port must be -1 (off), 0 (free) or a port, got {self.http_port}")
        self.pairs()  # raises on a malformed pair list
        if not self.treekv_addr:
            raise ValueError("--treekv-addr is required")
        if self.lease_renew_s <= 0:
            raise ValueError(f"--lease-renew-s must be positive, got {self.lease_renew_s}")
        if self.rpc_timeout_s <= 0:
            raise ValueError(f"--rpc-timeout-s must be positive, got {self.rpc_timeout_s}")
