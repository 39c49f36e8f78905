"""The life cycle every service process shares: logging, metrics port, ready file, clean stop."""
from __future__ import annotations

import argparse
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


def service_main(service: str, config_cls: type, serve: Callable[[Any], Awaitable[None]], description: str,
                 argv: list[str] | None = None, hard_exit: bool = False) -> int:
    """The `specmesh serve <service>` entry point every service shares.

    Flags come from the service's config dataclass (plus SPECMESH_* env); a config with a
    `validate()` gets it run (bad values exit 2 with the usage line). User-fixable failures (a
    taken port, a missing model) end with one log line, never a traceback. hard_exit skips
    interpreter teardown: model services have receiver threads parked in native gloo receives,
    and tearing the interpreter down under them aborts the process ("terminate called ...").
    """
    from .errors import SpecmeshError
    from .security import MeshSecurity
    from .service_config import add_dataclass_arguments, from_namespace, setup_logging

    parser = argparse.ArgumentParser(prog=f"specmesh serve {service}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(parser, config_cls)
    config = from_namespace(config_cls, parser.parse_args(argv))
    try:
        if hasattr(config, "validate"):
            config.validate()
        MeshSecurity.from_config(config)  # unreadable certificates or secrets: one line, before start-up
    except ValueError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level, service)
    code = 0
    try:
        asyncio.run(serve(config))
    except (OSError, SpecmeshError) as exc:
        log.error("%s", exc)
        code = 2 if isinstance(exc, SpecmeshError) else 1
    except KeyboardInterrupt:
        code = 130
    if hard_exit:
        logging.shutdown()
        os._exit(code)
    return code
