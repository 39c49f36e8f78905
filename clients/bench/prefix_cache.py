"""Prefix-cache benchmark: the two workloads of issue 11, each against a mesh with the cache on and
against one with it off (treekv `--prefix-cache false`), started the same way one after the other.

- chat: turn 1 is a ~`chat_tokens`-token user message; turn 2 repeats it with the answer and adds a
  short question. Reported: turn 2's time to first token, cache on against cache off.
- shared system prompt: `users` concurrent requests whose chat shares a ~`system_tokens`-token
  system prompt, each with its own question. Reported: prefill work, the prompt tokens the target
  really computed (prompt tokens minus `usage.cached_tokens`), cache on against cache off.

Both are greedy and short (the point is the prompt, not the answer).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from .prompts import Prompt

STARTUP_TIMEOUT_S = 1200.0
REQUEST_TIMEOUT_S = 1200.0


@dataclass
class Reply:
    """One request's outcome, as the router reported it."""

    text: str
    ttft_s: float
    wall_s: float
    prompt_tokens: int
    cached_tokens: int


@dataclass
class CacheRun:
    """Both workloads on one mesh (cache on or off)."""

    prefix_cache: bool
    turn1: Reply
    turn2: Reply
    users: list[Reply]
    users_wall_s: float

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens the target computed across the concurrent users."""
        return sum(r.prompt_tokens - r.cached_tokens for r in self.users)


def ask(stub: pb_grpc.GenerationStub, messages: list[tuple[str, str]], max_tokens: int) -> Reply:
    """One greedy chat request, streamed; the first token's arrival and the final usage."""
    req = pb.GenerateRequest(max_tokens=max_tokens, sampling=pb.SamplingOptions(temperature=0.0))
    for role, content in messages:
        req.messages.messages.append(pb.ChatMessage(role=role, content=content))
    t0 = time.perf_counter()
    ttft, text, usage = None, [], None
    for response in stub.Generate(req, timeout=REQUEST_TIMEOUT_S):
        if response.HasField("chunk"):
            if response.chunk.token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            text.append(response.chunk.text)
        else:
            usage = response.final.usage
    wall = time.perf_counter() - t0
    assert usage is not None, "the stream ended without a final message"
    return Reply("".join(text), ttft if ttft is not None else wall, wall, usage.prompt_tokens, usage.cached_tokens)


def long_text(prompts: list[Prompt], words: int) -> str:
    """About `words` words of real prompt text (prompts joined in order, again if too few, cut at a word)."""
    out: list[str] = []
    while len(out) < words:
        out += [w for p in prompts for w in p.text.split()]
    return " ".join(out[:words])


def run_workloads(addr: str, prefix_cache: bool, prompts: list[Prompt], chat_words: int, system_words: int,
                  users: int, max_tokens: int) -> CacheRun:
    """The chat and the shared-system-prompt workloads against one running router."""
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.GenerationStub(channel)
        first = long_text(prompts, chat_words)
        turn1 = ask(stub, [("user", first)], max_tokens)
        follow_up = "Thanks. Now list the three most important points of that text, one line each, in order."
        turn2 = ask(stub, [("user", first), ("assistant", turn1.text), ("user", follow_up)], max_tokens)
        system = "You are a careful assistant. Use this background: " + long_text(prompts[::-1], system_words)
        questions = [p.text.split("\n")[0][:300] for p in prompts[:users]]
        replies: list[Reply | None] = [None] * users

        def user(i: int) -> None:
            replies[i] = ask(stub, [("system", system), ("user", questions[i % len(questions)])], max_tokens)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    missing = [i for i, r in enumerate(replies) if r is None]
    if missing:
        raise RuntimeError(f"user streams {missing} failed (see the mesh's log)")
    return CacheRun(prefix_cache, turn1, turn2, [r for r in replies if r is not None], wall)


def start_mesh(up_args: list[str], prefix_cache: bool, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`specmesh up` with the cache on or off, on free ports; returns the process and router address."""
    ready = workdir / f"up-{'on' if prefix_cache else 'off'}.ready"
    cmd = [sys.executable, "-m", "specmesh.clients.cli", "up", "--port", "0", "--http-port", "-1",
           "--ready-file", str(ready), "--prefix-cache", "true" if prefix_cache else "false", *up_args]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"specmesh up exited with status {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            stop_mesh(proc)
            raise RuntimeError("specmesh up was not ready in time")
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())["addr"]


def stop_mesh(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(up_args: list[str], prompts: list[Prompt], chat_words: int = 700, system_words: int = 350,
        users: int = 8, max_tokens: int = 32, progress=print) -> list[CacheRun]:  # type: ignore[no-untyped-def]
    """Cache off, then cache on, each on a freshly started mesh."""
    runs = []
    workdir = Path(tempfile.mkdtemp(prefix="specmesh-cachebench-"))
    for prefix_cache in (False, True):
        progress(f"prefix cache {'on' if prefix_cache else 'off'}: starting the mesh")
        proc, addr = start_mesh(up_args, prefix_cache, workdir)
        try:
            progress(f"prefix cache {'on' if prefix_cache else 'off'}: running")
            runs.append(run_workloads(addr, prefix_cache, prompts, chat_words, system_words, users, max_tokens))
        finally:
            stop_mesh(proc)
    return runs


def table(runs: list[CacheRun]) -> str:
    """Markdown: both workloads, cache off and on, with the on/off ratios."""
    by = {r.prefix_cache: r for r in runs}
    lines = ["| prefix cache | chat turn 1 TTFT s (prompt) | chat turn 2 TTFT s (prompt, cached) | "
             "users prefill tokens (of prompt) | users wall s |", "|---|---|---|---|---|"]
    for r in runs:
        prompt_total = sum(u.prompt_tokens for u in r.users)
        lines.append(f"| {'on' if r.prefix_cache else 'off'} | {r.turn1.ttft_s:.2f} ({r.turn1.prompt_tokens}) | "
                     f"{r.turn2.ttft_s:.2f} ({r.turn2.prompt_tokens}, {r.turn2.cached_tokens}) | "
                     f"{r.prefill_tokens} (of {prompt_total}) | {r.users_wall_s:.1f} |")
    if True in by and False in by:
        on, off = by[True], by[False]
        lines.append("")
        lines.append(f"turn 2 TTFT on / off: {on.turn2.ttft_s / off.turn2.ttft_s:.3f}x; "
                     f"users' prefill work on / off: {on.prefill_tokens / max(off.prefill_tokens, 1):.3f}x")
    return "\n".join(lines)


def to_json(runs: list[CacheRun]) -> list[dict]:
    return [{**asdict(r), "prefill_tokens": r.prefill_tokens} for r in runs]
