"""Start specmesh services as real subprocesses for tests, and always clean them up.

    proc = start_service("specmesh.services.treekv.server", ["--lease-ttl-s", "30"])
    try:
        channel = grpc.insecure_channel(proc.addr)
        ...
    finally:
        proc.stop()

or `with start_service(...) as proc:`, or the `service_factory` fixture (import it into a test
module: `from service_helpers import service_factory`), which stops everything it started.

Each service is started with `--port 0` (unless args name a port) and `--ready-file` in a fresh temp
dir; start_service returns once the service has written its bound port there. The child's stdout
and stderr go to a temp file whose tail is included in every failure message.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import pytest

_LIVE: set["ServiceProcess"] = set()  # safety net: anything not stopped is killed at interpreter exit


class ServiceStartError(RuntimeError):
    """The service died or did not become ready in time; the message ends with its log tail."""


class ServiceProcess:
    """A running service subprocess: `.addr` ("127.0.0.1:PORT"), `.port`, `.proc`, `.stop()`."""

    def __init__(self, module: str, proc: subprocess.Popen[bytes], workdir: tempfile.TemporaryDirectory[str],
                 log_path: str, ready_file: str, host: str) -> None:
        self.module = module
        self.proc = proc
        self.log_path = log_path
        self.ready_file = ready_file
        self.host = host
        self.port: int = 0
        self.ready: dict = {}
        self._workdir = workdir
        self._final_log: str | None = None  # kept at stop(), when the temp dir with the log goes away

    @property
    def addr(self) -> str:
        """host:port to dial (only valid once start_service returned)."""
        return f"{self.host}:{self.port}"

    def log_tail(self, max_chars: int = 6000) -> str:
        """The last `max_chars` of the child's combined stdout/stderr (still available after stop())."""
        if self._final_log is not None:
            return self._final_log[-max_chars:]
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_chars))
                return f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"<no log: {exc}>"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Safe to call twice; returns the exit status.

        Signals go to the child's own process group, so helpers it spawned (e.g. tensor-parallel
        ranks) go down with it.
        """
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        else:
            self._signal(signal.SIGKILL)  # the leader exited; make sure no child of it lingers
        _LIVE.discard(self)
        if self._final_log is None:
            self._final_log = self.log_tail(100_000)
        self._workdir.cleanup()
        return self.proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # start_new_session made pid the group id
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServiceProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_service(module: str, args: list[str], timeout: float = 60, env: dict[str, str] | None = None,
                  host: str = "127.0.0.1") -> ServiceProcess:
    """Run `python -m module *args` and wait for its ready file; the caller must .stop() it.

    Adds `--port 0` unless args contain `--port`, and `--ready-file` unless they contain one.
    `env` entries are added to (not replacing) this process's environment. Raises
    ServiceStartError, with the child's log tail, if it exits or is not ready within `timeout`
    seconds; the child is killed first in both cases.
    """
    workdir = tempfile.TemporaryDirectory(prefix="specmesh-svc-")
    log_path = os.path.join(workdir.name, "service.log")
    args = list(args)
    if "--port" not in args and not any(a.startswith("--port=") for a in args):
        args += ["--port", "0"]
    ready_file = _flag_value(args, "--ready-file")
    if ready_file is None:
        ready_file = os.path.join(workdir.name, "ready")
        args += ["--ready-file", ready_file]
    elif os.path.exists(ready_file):
        os.remove(ready_file)  # a stale file from an earlier run would look ready immediately
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, env=child_env,
                                start_new_session=True)
    service = ServiceProcess(module, proc, workdir, log_path, ready_file, host)
    _LIVE.add(service)
    try:
        service.port = _wait_ready(service, timeout)
    except BaseException:
        tail = service.log_tail()
        status = proc.poll()
        service.stop()
        how = f"exited with status {status}" if status is not None else f"was not ready after {timeout:g}s"
        raise ServiceStartError(f"{module} {' '.join(args)} {how}; log tail:\n{tail}") from None
    return service


def _wait_ready(service: ServiceProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(service.ready_file) as f:
                text = f.read().strip()
            if text:
                service.ready = json.loads(text)  # {"port": ..., plus service-specific ports}
                return int(service.ready["port"])
        except (FileNotFoundError, ValueError):
            pass  # not written yet (services write it atomically, but be tolerant of others)
        if service.proc.poll() is not None:
            raise ServiceStartError("exited")
        if time.monotonic() > deadline:
            raise ServiceStartError("timeout")
        time.sleep(0.05)


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.fixture
def service_factory() -> Iterator[Callable[..., ServiceProcess]]:
    """A start_service that stops (and, if needed, kills) every service it started at teardown."""
    started: list[ServiceProcess] = []

    def factory(module: str, args: list[str], timeout: float = 60, **kwargs: object) -> ServiceProcess:
        service = start_service(module, args, timeout, **kwargs)  # type: ignore[arg-type]
        started.append(service)
        return service

    try:
        yield factory
    finally:
        for service in reversed(started):
            service.stop()


@atexit.register
def _kill_leftovers() -> None:
    for service in list(_LIVE):
        service.stop(timeout=2)
