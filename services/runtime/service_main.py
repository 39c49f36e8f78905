"""The life cycle every service process shares: logging, metrics port, ready file, clean stop."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Any, Awaitable, Callable

log = logging.getLogger("specmesh.service")


def write_ready_file(path: str, payload: dict[str, Any]) -> None:
    """Atomically publish the bound ports (what `specmesh up` and the tests wait for)."""
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def start_metrics(host: str, port: int) -> int | None:
    """Prometheus /metrics on its own port (-1 = off, 0 = a free port); returns the bound port."""
    if port < 0:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    return server.server_port


async def wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(main: Callable[[], Awaitable[None]]) -> int:
    """asyncio.run with a one-line error instead of a traceback for user-fixable problems."""
    from .errors import SpecmeshError

    try:
        asyncio.run(main())
    except SpecmeshError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        pass
    return 0
