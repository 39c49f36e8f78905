"""`specmesh up`: the whole mesh on this machine — treekv, target, draft, router — until Ctrl-C.

`--pairs N` runs N draft/target pairs (services `target`/`draft` for pair 0, `target-i`/`draft-i`
for pair i, each on free ports) behind the one router, which gets them as its pair list.

It supervises them: a draft or treekv that dies is named on the console and started again on its
old port (the router re-pairs a new draft by itself; a new treekv restores the leases its
predecessor granted from the lease file). Running streams do not need either, so they go on. A
dead router or target stops the mesh. SIGTERM / Ctrl-C drains: every service refuses new work and
gives the streams in flight up to --shutdown-grace-s to finish.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import add_weights_argument, fail, model_dirs

NAME = "up"


def add_parser(sub: argparse._SubParsersAction) -> str:
    p = sub.add_parser(NAME, help="start router + draft + target + treekv locally and print the router address")
    p.add_argument("--target", default=None, help="target model: directory or .gguf (default pair if omitted)")
    p.add_argument("--draft", default=None, help="draft model: directory or .gguf (default pair if omitted)")
    p.add_argument("--tiny", action="store_true", help="tiny random model pair (smoke tests)")
    p.add_argument("--pairs", type=int, default=1, help="draft/target pairs (each a draft and a target process)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of every service (loopback by default)")
    p.add_argument("--port", type=int, default=50051, help="router gRPC port (0 = free)")
    p.add_argument("--http-port", type=int, default=8000, help="router OpenAI-style HTTP port (0 = free, -1 = off)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    add_weights_argument(p)
    p.add_argument("--target-threads", type=int, default=0, help="per target; 0 = its pair's share of the cores "
                                                                  "but the draft's")
    p.add_argument("--draft-threads", type=int, default=0, help="per draft; 0 = one core per four of its pair's "
                                                                 "share, at least one")
    p.add_argument("--pool-blocks", type=int, default=1024, help="KV blocks per model pool (each draft and target)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefix-cache", choices=["true", "false"], default="true",
                   help="treekv hints shared prefixes to the services (false: every prompt is prefilled)")
    p.add_argument("--width", type=int, default=4, help="w: leaves per draft expansion")
    p.add_argument("--subtree-size", type=int, default=16, help="bs: nodes per verification")
    p.add_argument("--depth", type=int, default=0, help="d: expansions per round (0 = timed at start-up)")
    p.add_argument("--no-plan", action="store_true", help="the draft always sends --subtree-size nodes (default: "
                                                          "it sizes each greedy subtree by expected tokens per second)")
    p.add_argument("--max-context", type=int, default=4096)
    p.add_argument("--metrics", action="store_true", help="serve Prometheus /metrics on free ports")
    p.add_argument("--ready-file", default="", help="write the router's ports here (JSON) once it is up")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on Ctrl-C / SIGTERM: seconds in-flight streams get to finish")
    p.add_argument("--extra-draft-args", default="", help=argparse.SUPPRESS)  # tests: e.g. delays
    p.add_argument("--extra-target-args", default="", help=argparse.SUPPRESS)
    return NAME


@dataclass
class Mesh:
    """The four child processes and the folder holding their ready files."""

    workdir: Path
    grace_s: float = 30.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ready: dict[str, dict] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)  # when each service was restarted

    def start(self, service: str, args: list[str]) -> None:
        """Start `service` ("treekv", "target", "draft-1", ...: the part before "-" names the module)."""
        ready = self.workdir / f"{service}.ready"
        ready.unlink(missing_ok=True)
        self.args[service] = args
        module = service.split("-", 1)[0]
        cmd = [sys.executable, "-m", f"specmesh.services.{module}.server", "--ready-file", str(ready),
               "--shutdown-grace-s", str(self.grace_s), *args]
        self.procs[service] = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)

    def restart(self, service: str, timeout: float) -> dict:
        """Start a dead service again on the port it had: its peers keep dialing that address.
        Raises RuntimeError when it keeps dying (MAX_RESTARTS within a minute)."""
        now = time.monotonic()
        recent = [t for t in self.restarts.get(service, []) if now - t < 60]
        if len(recent) >= MAX_RESTARTS:
            raise RuntimeError(f"{service} died {len(recent) + 1} times within a minute; stopping")
        self.restarts[service] = [*recent, now]
        self.start(service, _with_port(self.args[service], self.ready[service]["port"]))
        return self.wait(service, timeout)

    def wait(self, service: str, timeout: float) -> dict:
        ready = self.workdir / f"{service}.ready"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.procs[service].poll() is not None:
                raise RuntimeError(f"{service} exited with status {self.procs[service].returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service} not ready after {timeout:.0f}s")
            time.sleep(0.1)
        self.ready[service] = json.loads(ready.read_text())
        return self.ready[service]

    def stop(self) -> None:
        # A second Ctrl-C must not cut this short and orphan the services.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 10  # the services drain first
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def any_dead(self) -> str | None:
        return next((name for name, p in self.procs.items() if p.poll() is not None), None)


MAX_RESTARTS = 5  # per service and minute; more means it cannot run here


def _with_port(args: list[str], port: int) -> list[str]:
    """args with the value of --port replaced."""
    out = list(args)
    out[out.index("--port") + 1] = str(port)
    return out


def _die_with_parent() -> None:
    """Linux: SIGTERM the service if `specmesh up` itself is killed (no orphans holding ports)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _write_ready(path: str, router: dict, mesh: Mesh) -> None:
    """The router's ports plus every service's ready info and pid (JSON, replaced atomically)."""
    if path:
        tmp = path + ".tmp"
        Path(tmp).write_text(json.dumps({**router, "services": mesh.ready,
                                         "pids": {k: p.pid for k, p in mesh.procs.items()}}))
        os.replace(tmp, path)


def thread_split(target_threads: int, draft_threads: int, pairs: int = 1) -> tuple[int, int]:
    """Threads per target and per draft. All of them run at the same time: each pair gets an
    equal share of the cores, split between its draft and its target."""
    cores = max(1, (os.cpu_count() or 2) // pairs)
    draft = draft_threads or max(1, cores // 4)
    target = target_threads or max(1, cores - draft)
    return target, draft


def pair_names(pairs: int) -> list[tuple[str, str]]:
    """(target, draft) service names per pair: pair 0 keeps the plain names."""
    return [("target", "draft") if i == 0 else (f"target-{i}", f"draft-{i}") for i in range(pairs)]


def run(args: argparse.Namespace) -> int:
    from specmesh.services.runtime.errors import SpecmeshError

    if args.pairs < 1:
        return fail(f"--pairs must be at least 1, got {args.pairs}")
    try:
        target_dir, draft_dir = model_dirs(args)
    except SpecmeshError as exc:
        return fail(str(exc))
    target_threads, draft_threads = thread_split(args.target_threads, args.draft_threads, args.pairs)
    names = pair_names(args.pairs)
    mesh = Mesh(Path(tempfile.mkdtemp(prefix="specmesh-up-")), grace_s=args.shutdown_grace_s)
    common = ["--host", args.host, "--log-level", args.log_level]
    metrics = ["--metrics-port", "0"] if args.metrics else []
    pools = ["--pool-blocks", str(args.pool_blocks), "--block-size", str(args.block_size),
             "--max-context", str(args.max_context), "--dtype", args.dtype, "--weights", args.weights,
             "--activations", args.activations]
    try:
        # treekv learns the pools' sizes from the services (the router registers them).
        mesh.start("treekv", [*common, *metrics, "--port", "0", "--state-file", str(mesh.workdir / "treekv.leases"),
                              "--prefix-cache" if args.prefix_cache == "true" else "--no-prefix-cache"])
        for target, draft in names:
            mesh.start(target, [*common, *metrics, *pools, "--port", "0", "--tensor-port", "0",
                                "--model", str(target_dir), "--threads", str(target_threads),
                                "--calibrate-tokens", str(args.subtree_size), *args.extra_target_args.split()])
            mesh.start(draft, [*common, *metrics, *pools, "--port", "0", "--model", str(draft_dir),
                               "--threads", str(draft_threads), "--tree-width", str(args.width),
                               *(["--no-plan"] if args.no_plan else []), *args.extra_draft_args.split()])
        addr = {name: f"{args.host}:{mesh.wait(name, 600)['port']}"
                for name in ("treekv", *(name for pair in names for name in pair))}
        mesh.start("router", [*common, *metrics, "--port", str(args.port), "--http-port", str(args.http_port),
                              "--model", str(target_dir), "--draft-addr", ",".join(addr[d] for _, d in names),
                              "--target-addr", ",".join(addr[t] for t, _ in names), "--treekv-addr", addr["treekv"],
                              "--tree-width", str(args.width), "--subtree-size", str(args.subtree_size),
                              "--depth", str(args.depth), "--max-context", str(args.max_context)])
        router = mesh.wait("router", 300)
        router_addr = f"{args.host}:{router['port']}"
        http = f", HTTP http://{args.host}:{router['http_port']}/v1" if router.get("http_port") else ""
        pairs = f", {args.pairs} draft/target pairs" if args.pairs > 1 else ""
        print(f"specmesh is up: router {router_addr}{http}{pairs} (Ctrl-C stops all {len(mesh.procs)} services)",
              flush=True)
        publish = lambda: _write_ready(args.ready_file, {**router, "addr": router_addr}, mesh)  # noqa: E731
        publish()
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while True:
            dead = mesh.any_dead()
            if dead == "router" or (dead is not None and dead.startswith("target")):
                print(f"error: {dead} exited with status {mesh.procs[dead].returncode}; stopping", file=sys.stderr)
                return 1
            if dead is not None:  # draft or treekv: nothing running depends on them
                print(f"warning: {dead} exited with status {mesh.procs[dead].returncode}; restarting it",
                      file=sys.stderr, flush=True)
                mesh.restart(dead, 600)
                print(f"{dead} is back on {args.host}:{mesh.ready[dead]['port']}", file=sys.stderr, flush=True)
                publish()  # its new pid
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        return fail(str(exc))
    finally:
        mesh.stop()
