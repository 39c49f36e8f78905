"""Load test: N concurrent streams of a prompt set against running routers, N = 1, 2, 4, 8, ...

Each level runs `concurrency` client threads that take prompts from one shared queue (so every
level generates the same prompts) and stream them through the router's gRPC `Generate`. Per
level it reports aggregate tokens/s (all tokens over the level's wall time), p50/p99 time to
first token, p50/p99 inter-token latency (a round's gap spread over the tokens it brought), and
the mean tree size the target verified per round. Running it against a second router whose
mesh has no draft gives "target alone" beside "mesh" at every level.

Both systems share one target and its prefix cache. So that every system prefills what it is
timed on, each (system, level) run tags its prompts with its own first line, unless asked to
repeat them exactly (`cached=True`: later runs then start from the prefix cache).
"""
from __future__ import annotations

import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc

from .prompts import Prompt


@dataclass
class StreamRecord:
    tokens: int
    ttft_s: float
    itl_s: list[float]  # one per token after the first chunk
    tree_sizes: list[int]
    wall_s: float
    error: str | None = None


@dataclass
class LevelResult:
    system: str
    concurrency: int
    streams: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    mean_tree_size: float
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def request_for(prompt: Prompt, max_tokens: int, raw: bool, tag: str = "") -> pb.GenerateRequest:
    """The prompt's greedy request; `tag` (if any) goes first, as a system message or a first line."""
    req = pb.GenerateRequest(max_tokens=max_tokens, ignore_eos=True, sampling=pb.SamplingOptions(temperature=0.0))
    if raw:
        req.prompt = f"{tag}\n{prompt.text}" if tag else prompt.text
    else:
        if tag:
            req.messages.messages.append(pb.ChatMessage(role="system", content=tag))
        req.messages.messages.append(pb.ChatMessage(role="user", content=prompt.text))
    return req


def stream_once(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, timeout: float) -> StreamRecord:
    t0 = time.perf_counter()
    last, tokens, ttft = t0, 0, None
    itl: list[float] = []
    trees: list[int] = []
    try:
        for response in stub.Generate(request, timeout=timeout):
            if not response.HasField("chunk") or not response.chunk.token_ids:
                continue
            now = time.perf_counter()
            n = len(response.chunk.token_ids)
            if ttft is None:
                ttft = now - t0
            else:
                itl += [(now - last) / n] * n
                trees.append(response.chunk.tree_size)
            tokens += n
            last = now
    except grpc.RpcError as exc:
        return StreamRecord(tokens, ttft or 0.0, itl, trees, time.perf_counter() - t0,
                            f"{exc.code().name}: {exc.details()}")
    return StreamRecord(tokens, ttft or 0.0, itl, trees, time.perf_counter() - t0)


def run_level(addr: str, system: str, prompts: list[Prompt], concurrency: int, max_tokens: int,
              raw: bool = False, timeout: float = 600.0, tag: str = "") -> LevelResult:
    """All prompts through `concurrency` concurrent streams; the level's numbers."""
    work: queue.Queue = queue.Queue()
    for p in prompts:
        work.put(p)
    records: list[StreamRecord] = []
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.GenerationStub(channel)
            while True:
                try:
                    prompt = work.get_nowait()
                except queue.Empty:
                    return
                record = stream_once(stub, request_for(prompt, max_tokens, raw, tag), timeout)
                with lock:
                    records.append(record)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"loadtest-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in records)
    ttft = [r.ttft_s * 1000 for r in ok]
    itl = [x * 1000 for r in ok for x in r.itl_s]
    trees = [t for r in ok for t in r.tree_sizes]
    return LevelResult(system, concurrency, len(records), tokens, wall, tokens / wall if wall > 0 else 0.0,
                       percentile(ttft, 50), percentile(ttft, 99), percentile(itl, 50), percentile(itl, 99),
                       statistics.fmean(trees) if trees else 0.0, [r.error for r in records if r.error])


def run_loadtest(systems: dict[str, str], prompts: list[Prompt], levels: list[int], max_tokens: int,
                 raw: bool = False, progress=None, cached: bool = False) -> list[LevelResult]:  # type: ignore[no-untyped-def]
    """Every system (name -> router address) at every concurrency level, returned by system, then
    level. They run interleaved (each level on every system before the next level): this machine's
    speed drifts by tens of percent over minutes, and each ratio between systems then compares
    runs a minute apart, not the two ends of the whole test."""
    results = []
    run_id = time.time_ns()  # tags differ from any earlier load test's, whose KV may still be cached
    for level in levels:
        for name, addr in systems.items():
            # What differs comes first: runs share at most a token or two of it.
            tag = "" if cached else f"[{name} x{level} {run_id}] You are a helpful assistant."
            result = run_level(addr, name, prompts, level, max_tokens, raw, tag=tag)
            if progress is not None:
                progress(result)
            results.append(result)
    order = list(systems)
    return sorted(results, key=lambda r: (order.index(r.system), levels.index(r.concurrency)))


def table(results: list[LevelResult]) -> str:
    """A markdown table, with each level's tokens/s relative to the same system at 1 stream."""
    single = {r.system: r.tokens_per_s for r in results if r.concurrency == 1}
    lines = ["| system | streams | tok/s | x 1 stream | TTFT p50 / p99 ms | ITL p50 / p99 ms | mean tree |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        rel = f"{r.tokens_per_s / single[r.system]:.2f}x" if single.get(r.system) else "-"
        lines.append(f"| {r.system} | {r.concurrency} | {r.tokens_per_s:.1f} | {rel} | {r.ttft_p50_ms:.0f} / "
                     f"{r.ttft_p99_ms:.0f} | {r.itl_p50_ms:.1f} / {r.itl_p99_ms:.1f} | {r.mean_tree_size:.1f} |")
    return "\n".join(lines)


def to_json(results: list[LevelResult]) -> list[dict]:
    return [asdict(r) for r in results]


def plot(results: list[LevelResult], path: str | Path) -> None:
    """Aggregate tokens/s and p99 inter-token latency against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tps, itl) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for system in dict.fromkeys(r.system for r in results):
        rows = [r for r in results if r.system == system]
        xs = [r.concurrency for r in rows]
        tps.plot(xs, [r.tokens_per_s for r in rows], marker="o", label=system)
        itl.plot(xs, [r.itl_p99_ms for r in rows], marker="o", label=system)
    for ax, title in ((tps, "aggregate tokens/s"), (itl, "p99 inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
