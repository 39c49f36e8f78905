"""Milliseconds per matmul of the int4 kernels on the 1.5B target's shapes, and per whole forward.

    python -m specmesh.clients.bench.kernels [--threads 1 2] [--rows 1 2 4 8 16] [--repeats 7]

Compares ATen's ``_weight_int4pack_mm_for_cpu`` (int4, g32), specmesh's AVX-512 kernel
(kernels/int4_gemm, int4 g32, bf16 scales: the same 4.5 bits per weight) with bf16 activations and
with int8 (Q8) activations, and dense bf16 ``F.linear``. Two tables per thread count:

- per shape (qkv, o, gate_up, down, lm_head): the small shapes sit partly in cache, so these are
  lower bounds;
- a whole forward: 28 layers of the four shapes plus the LM head, cycling through distinct weight
  copies that together exceed the L3 cache, so every layer streams its weights from memory (the
  realistic figure).

``--model target`` (or draft, or a model path) instead times every projection of that real model's
forward in its own weight formats (GGUF: int4 and int8), exact against Q8 activations.

Every figure is the median of ``--repeats`` timed runs after one warm-up; the machine may be
shared and noisy, so compare ratios (printed beside the times) rather than absolute values. On a
busy machine ``--clock thread`` (one thread only) times the calling thread's CPU time instead of
the wall clock, which leaves out the time the scheduler gave to other processes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from specmesh.kernels import int4_gemm as k4
from specmesh.services.runtime.quant import Int4Groups

SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)}
LM_HEAD = (151936, 1536)
LAYERS = 28
FORMATS = ("aten_int4", "specmesh_int4", "specmesh_int4_q8", "bf16")
LABELS = {"aten_int4": "ATen int4", "specmesh_int4": "specmesh int4", "specmesh_int4_q8": "specmesh int4 q8",
          "bf16": "bf16 F.linear"}


def make_weight(fmt: str, n: int, k: int, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random [n, k] weight in format `fmt`, as a function x -> x @ W.T."""
    if fmt == "bf16":
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        return lambda x: F.linear(x, w)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    if fmt == "aten_int4":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        sz = torch.rand(k // 32, n, 2, generator=gen).to(torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    packed4 = k4.pack(Int4Groups(q, torch.rand(n, k // 32, generator=gen), torch.rand(n, k // 32, generator=gen)))
    q8 = fmt == "specmesh_int4_q8"
    return lambda x: k4.int4_gemm_cpu(x, packed4, int8_activations=q8)


def median_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def table(title: str, rows: list[int], times: dict[tuple[str, int], float]) -> str:
    """Milliseconds per format, then each format's time over the q8 kernel's and q8's M over M=1."""
    others = [f for f in FORMATS if f != "specmesh_int4_q8"]
    head = " | ".join(LABELS[f] for f in FORMATS)
    ratios = " | ".join(f"{LABELS[f]} / q8" for f in others)
    lines = [f"### {title}", "", f"| M | {head} | {ratios} | q8 M / M=1 |", "|---" * (len(FORMATS) + len(others) + 2) + "|"]
    for m in rows:
        q8 = times[("specmesh_int4_q8", m)]
        cells = " | ".join(f"{times[(f, m)]:.2f}" for f in FORMATS)
        rel = " | ".join(f"{times[(f, m)] / q8:.2f}x" for f in others)
        lines.append(f"| {m} | {cells} | {rel} | {q8 / times[('specmesh_int4_q8', rows[0])]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--copies", type=int, default=4,
                        help="distinct copies of each layer's weights in the whole forward (4 x 26 MB "
                             "of int4 per layer exceeds a 32 MB L3)")
    parser.add_argument("--skip-shapes", action="store_true", help="only the whole-forward table")
    parser.add_argument("--model", default=None,
                        help="target | draft | a model path: time that model's projections instead")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: CPU time of the calling thread (needs --threads 1)")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != [1]:
        parser.error("--clock thread measures one thread's CPU time: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if not k4.available():
        print(f"specmesh int4 kernel unavailable: {k4.unavailable_reason()}", file=sys.stderr)
        return 1
    if args.model:
        return real_model(args.model, args.threads, args.rows, args.repeats, clock)
    gen = torch.Generator().manual_seed(0)
    all_shapes = {**SHAPES, "lm_head": LM_HEAD}
    weights = {f: {name: [make_weight(f, *shape, gen) for _ in range(1 if name == "lm_head" else args.copies)]
                   for name, shape in all_shapes.items()} for f in FORMATS}
    print(f"torch {torch.__version__}; rows M = {args.rows}; median of {args.repeats} runs ({args.clock} clock); "
          "ms per matmul\n")
    for threads in args.threads:
        torch.set_num_threads(threads)
        xs = {m: {k: torch.randn(m, k, generator=gen).to(torch.bfloat16) for k in {s[1] for s in all_shapes.values()}}
              for m in args.rows}
        if not args.skip_shapes:
            for name, (n, k) in all_shapes.items():
                times = {(f, m): median_ms(lambda: weights[f][name][0](xs[m][k]), args.repeats, clock)
                         for f in FORMATS for m in args.rows}
                print(table(f"{name} {n} x {k}, {threads} thread(s)", args.rows, times), "\n", flush=True)

        def forward(f: str, m: int) -> None:
            for layer in range(LAYERS):
                for name, (_, k) in SHAPES.items():
                    weights[f][name][layer % args.copies](xs[m][k])
            weights[f]["lm_head"][0](xs[m][LM_HEAD[1]])

        times = {(f, m): median_ms(lambda: forward(f, m), args.repeats, clock) for f in FORMATS for m in args.rows}
        print(table(f"whole forward ({LAYERS} layers + LM head), {threads} thread(s)", args.rows, times),
              "\n", flush=True)
    return 0


def real_model(model: str, threads: list[int], rows: list[int], repeats: int, clock: Callable[[], float]) -> int:
    """Milliseconds of one forward's projections of a real model, exact vs Q8 activations."""
    from specmesh.models.store import resolve_model_dir
    from specmesh.models.weight_cache import load_runner
    from specmesh.services.runtime.model_worker import model_weights
    from specmesh.services.runtime.quant import linear, use_int8_activations

    named = model in ("target", "draft")
    model_dir = resolve_model_dir(None if named else model, model if named else "target")
    for t in threads:
        torch.set_num_threads(t)
        weights = model_weights(load_runner(model_dir, "auto", torch.bfloat16, keep_dense=False, progress=False))
        xs = {m: {k: torch.randn(m, k).to(torch.bfloat16) for k in {w.shape[1] for w in weights}} for m in rows}

        def forward(m: int) -> None:
            for w in weights:
                linear(xs[m][w.shape[1]], w, None, m)  # token rows: the kernels, whatever m is

        exact = {m: median_ms(lambda: forward(m), repeats, clock) for m in rows}
        use_int8_activations(weights)
        q8 = {m: median_ms(lambda: forward(m), repeats, clock) for m in rows}
        print(f"### {model}: projections of one forward, {t} thread(s), ms\n")
        print("| M | exact activations | Q8 activations | exact / Q8 | Q8 M / M=1 |\n|---|---|---|---|---|")
        for m in rows:
            print(f"| {m} | {exact[m]:.1f} | {q8[m]:.1f} | {exact[m] / q8[m]:.2f}x | {q8[m] / q8[rows[0]]:.2f}x |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
