"""llama.cpp as a benchmarked peer: `llama-server` on the pair's GGUF files, driven like the other systems.

Comparable by construction: the same prompt token ids (already chat-formatted by the target's
tokenizer) go to the raw /completion endpoint, greedy (temperature 0), with the same max new tokens,
context and thread budget; the prompt cache is off, so the warm-up does not prefill later prompts.
Each server listens on a free loopback port and is killed when its run ends, however it ends.

  llamacpp_ar    the target GGUF alone
  llamacpp_spec  `-md draft.gguf --spec-type draft-simple` (without --spec-type this llama.cpp loads
                 the draft and never uses it), one server per `--spec-draft-n-max` value of the sweep
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .systems import Progress, _peak_rss_kb, _record, _run_prompts

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 600.0
FINISH = {"eos": "eos", "limit": "length", "word": "stop"}  # llama.cpp's stop_type -> our finish names


def server_command(binary: str | Path, target_gguf: str | Path, port: int, threads: int, context: int,
                   draft_gguf: str | Path | None = None, draft_n_max: int | None = None) -> list[str]:
    """The llama-server command line: one slot, loopback only, every phase on the same thread budget."""
    t = str(threads)
    cmd = [str(binary), "-m", str(target_gguf), "--host", HOST, "--port", str(port), "-t", t, "-tb", t,
           "-c", str(context), "-np", "1", "--no-webui"]
    if draft_gguf is not None:
        if draft_n_max is None or draft_n_max < 1:
            raise ValueError("llama.cpp speculation needs --spec-draft-n-max >= 1")
        cmd += ["-md", str(draft_gguf), "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_n_max),
                "-td", t, "-tbd", t]
    return cmd


def completion_request(ids: list[int], max_new: int) -> dict[str, Any]:
    """The /completion body: our token ids verbatim, greedy, streamed, token ids back, no prompt cache."""
    return {"prompt": list(ids), "n_predict": max_new, "temperature": 0.0, "stream": True,
            "return_tokens": True, "cache_prompt": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: if the worker dies without cleaning up (SIGKILL, OOM killer), the
    kernel kills llama-server too (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def serve(command: list[str], port: int) -> Iterator[subprocess.Popen]:
    """Start llama-server, wait until /health answers 200, and always kill it (its whole group) after."""
    proc = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {proc.returncode} before it was ready "
                                   "(its output is in this system's log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server was not ready in {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def complete(port: int, ids: list[int], max_new: int) -> dict[str, Any]:
    """One streamed /completion: token ids, each token's arrival (s since the request), llama.cpp's timings."""
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    tokens: list[int] = []
    times: list[float] = []
    final: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/completion", json.dumps(completion_request(ids, max_new)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            msg = json.loads(line[len("data: "):])
            if "error" in msg:
                raise RuntimeError(f"llama-server: {msg['error']}")
            if msg.get("tokens"):
                now = time.perf_counter() - t0
                tokens += msg["tokens"]
                times += [now] * len(msg["tokens"])
            if msg.get("stop"):
                final = msg
                break
        wall = time.perf_counter() - t0
    finally:
        conn.close()
    if not final:
        raise RuntimeError("llama-server's stream ended without its final message")
    return {"tokens": tokens, "times": times, "wall": wall, "timings": final.get("timings", {}),
            "stop_type": final.get("stop_type")}


def _llamacpp_record(prompt: dict, out: dict) -> dict:
    """A bench record. llama.cpp streams one message per token, so rounds are not visible per token:
    its own draft counters give the target forwards (each commits its accepted drafts + 1 token)."""
    tokens = out["tokens"]
    accepted = int(out["timings"].get("draft_n_accepted", 0))
    rec = _record(prompt, tokens, out["wall"], [(t, 1, 0) for t in out["times"]], None,
                  FINISH.get(out["stop_type"], out["stop_type"]))
    rec.update(round_tokens=None, round_accepted=None, round_times_s=None, token_times_s=out["times"],
               target_forwards=len(tokens) - accepted, accepted_draft=accepted,
               drafted=int(out["timings"].get("draft_n", 0)), server_timings=out["timings"])
    return rec


def _run_server(spec: dict, progress: Progress, label: str, command_for_port) -> dict[str, Any]:
    """One server's life: start, warm up, every prompt, its peak RSS, stop."""
    port = free_port()
    command = command_for_port(port)
    t_load = time.perf_counter()
    progress("phase", f"{label}: starting llama-server")
    with serve(command, port) as proc:
        load_s = time.perf_counter() - t_load
        records = _run_prompts(spec, progress, lambda p, n: _llamacpp_record(p, complete(port, p["ids"], n)), label)
        peak = _peak_rss_kb(proc.pid)
    return {"records": records, "peak_rss_kb_server": peak, "load_s": load_s, "command": command}


def run_llamacpp(spec: dict, progress: Progress, speculative: bool) -> dict:
    from specmesh.models.store import source_gguf

    peer = spec["llamacpp"]
    binary, threads, context = peer["server"], spec["threads"], spec["context"]
    with contextlib.ExitStack() as stack:  # the default pair's GGUFs exist only while the servers run
        target = stack.enter_context(source_gguf(spec["target_dir"]))
        draft = stack.enter_context(source_gguf(spec["draft_dir"])) if speculative else None
        if target is None or (speculative and draft is None):
            raise RuntimeError("llama.cpp needs GGUF files: use the default pair or pass --target/--draft *.gguf")
        settings: dict[str, Any] = {"threads": threads, "context": context, "server": binary,
                                    "target_gguf": str(target), "draft_gguf": str(draft) if draft else None}
        if not speculative:
            run = _run_server(spec, progress, "llamacpp_ar",
                              lambda port: server_command(binary, target, port, threads, context))
            settings["command"] = run.pop("command")
            return {**run, "settings": settings}
        sweep = [{"setting": f"n-max={n_max}", "draft_n_max": n_max,
                  **_run_server(spec, progress, f"llamacpp_spec n-max={n_max}",
                                lambda port: server_command(binary, target, port, threads, context, draft, n_max))}
                 for n_max in peer["draft_n_max"]]
        return {"sweep": sweep, "settings": settings, "load_s": sweep[0]["load_s"]}
