"""gRPC plumbing shared by all four services: servers with health + reflection, channels, errors."""
from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import SpecmeshError
from .guard import SECRET_METADATA, Access, Guard
from .security import MeshSecurity

log = logging.getLogger("specmesh.rpc")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # control messages only; tensors go over the tensor channel
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    # A restarted peer (specmesh up restarts a dead draft or treekv) is dialed again within a second,
    # not after gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


async def start_server(host: str, port: int, register: Iterable[tuple[Callable[[Any, Any], None], Any]],
                       service_names: Iterable[str], access: Access = Access(),
                       credentials: grpc.ServerCredentials | None = None,
                       on_refused: Callable[[str], None] | None = None,
                       health_servicer: health.aio.HealthServicer | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with our servicers, standard health checking and reflection.

    Every request passes the Guard first (undecodable messages and callers `access` does not let
    in are refused; `on_refused` hears of each). With `credentials` the port speaks TLS only.
    Returns the server and the bound port (pass port 0 for a free one). Health reports SERVING for
    the overall server ("") and each named service; pass your own `health_servicer` to change that
    later (draining sets NOT_SERVING).
    """
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[Guard(access, on_refused)])
    for add, servicer in register:
        add(servicer, server)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    target = f"{host}:{port}"
    bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def start_internal_server(config: Any, register: Iterable[tuple[Callable[[Any, Any], None], Any]],
                                service_names: Iterable[str],
                                health_servicer: health.aio.HealthServicer | None = None) -> tuple[grpc.aio.Server, int]:
    """start_server for a mesh service (draft, target, treekv) on config.host:config.port: callers
    must carry the shared secret, and with a CA present a certificate it signed."""
    security = MeshSecurity.from_config(config)
    return await start_server(config.host, config.port, register, service_names, access=Access(secret=security.secret),
                              credentials=security.server_credentials(), health_servicer=health_servicer)


def _with_secret(d: grpc.aio.ClientCallDetails, secret: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(d.metadata or ()), (SECRET_METADATA, secret))
    return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# Two classes: a grpc.aio channel files each interceptor under one kind of call only.
class _SecretUnary(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the mesh's shared secret to every unary call."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(_with_secret(details, self.secret), request)


class _SecretStream(grpc.aio.UnaryStreamClientInterceptor):
    """Adds the mesh's shared secret to every server-streaming call."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(_with_secret(details, self.secret), request)


def connect(addr: str, security: MeshSecurity = MeshSecurity()) -> grpc.aio.Channel:
    """A channel to another mesh service: TLS when `security` has a CA, the secret on every call."""
    interceptors = [_SecretUnary(security.secret), _SecretStream(security.secret)] if security.secret else None
    credentials = security.channel_credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(addr, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS, interceptors=interceptors)


def status_code(exc: SpecmeshError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code_name, grpc.StatusCode.INTERNAL)


def rpc_errors(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn SpecmeshError into the matching gRPC status with its one-line message (unary methods)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except SpecmeshError as exc:
            await context.abort(status_code(exc), str(exc))

    return wrapper


async def wait_healthy(addr: str, timeout_s: float, service: str = "") -> None:
    """Block until addr answers health SERVING (used by `specmesh up` and the router at start-up)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    async with connect(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr} not healthy after {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
