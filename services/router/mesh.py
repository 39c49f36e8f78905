"""The router's connections to the mesh services, with errors translated into one-line SpecmeshErrors
that name the service and its address (what a user needs to find the broken piece)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc

from specmesh.v1 import mesh_pb2_grpc

from ..runtime import rpc
from ..runtime.errors import InvalidRequest, ResourceExhausted, ServiceUnavailable, SpecmeshError
from ..runtime.security import MeshSecurity

log = logging.getLogger("specmesh.router")


class PeerError(SpecmeshError):
    """Any other failure of a peer, passed on with the peer's status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.grpc_code_name = code.name


class Peer:
    """One mesh service: a lazily connecting channel, its stub, and error translation."""

    def __init__(self, name: str, addr: str, stub_cls: Any, timeout_s: float, security: MeshSecurity) -> None:
        self.name = name  # "target-service", ...
        self.addr = addr
        self.timeout_s = timeout_s
        self.channel = rpc.connect(addr, security)
        self.stub = stub_cls(self.channel)

    @property
    def host(self) -> str:
        """The host part of addr ("[::1]:5" -> "::1")."""
        return self.addr.rsplit(":", 1)[0].strip("[]") if ":" in self.addr else self.addr

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """A unary call with a deadline (never a hang); failures raise translated SpecmeshErrors."""
        try:
            return await getattr(self.stub, method)(request, timeout=timeout or self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc, method) from None

    def error(self, exc: grpc.aio.AioRpcError, method: str = "") -> SpecmeshError:
        """Translate a peer's gRPC status into the error the router's client should see."""
        code = exc.code()
        details = (exc.details() or "").splitlines()[0][:300] if exc.details() else ""
        where = f"{self.name} at {self.addr}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServiceUnavailable(f"{where} is unavailable" + (f" ({details})" if details else ""))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServiceUnavailable(f"{where} did not answer {method or 'in time'} "
                                      f"(deadline exceeded)")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"{self.name}: {details}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # Not the client's fault: the router's own credentials (secret, certificate) are wrong.
            return PeerError(grpc.StatusCode.INTERNAL, f"{where} refused the router: {details}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return PeerError(code, f"{where} does not implement {method or 'this call'} (wrong service at "
                                   f"this address?)")
        return PeerError(code, f"{self.name}: {details or code.name}")

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class Pair:
    """One draft/target pair. `id` is the target's address as the router dials it (the name treekv
    knows the pair by); `draft` is None for a target-only pair."""

    id: str
    target: Peer
    draft: Peer | None


class Mesh:
    """treekv and the pairs, in the order of --target-addr."""

    def __init__(self, treekv_addr: str, pairs: list[tuple[str, str]], timeout_s: float,
                 security: MeshSecurity = MeshSecurity()) -> None:
        self.treekv = Peer("treekv-service", treekv_addr, mesh_pb2_grpc.TreeKVStub, timeout_s, security)
        self.pairs = [Pair(target_addr, Peer("target-service", target_addr, mesh_pb2_grpc.TargetStub, timeout_s,
                                             security),
                           Peer("draft-service", draft_addr, mesh_pb2_grpc.DraftStub, timeout_s, security)
                           if draft_addr else None)
                      for target_addr, draft_addr in pairs]

    async def close(self) -> None:
        for peer in (self.treekv, *(p for pair in self.pairs for p in (pair.target, pair.draft))):
            if peer is not None:
                await peer.close()
