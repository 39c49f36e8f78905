"""The benchmarked systems. Each runs inside its own worker process (bench/worker.py) and
returns one raw record per prompt; all figures are derived later (bench/report.py).

A record: question_id, category, prompt_tokens, output_ids, new_tokens, wall_s (request start to
last token), ttft_s (to the first generated token), round_tokens / round_accepted (tokens
delivered and draft tokens accepted per target forward), target_forward_s (time inside target
forwards, None where it cannot be measured), finish. llama.cpp's records (bench/llamacpp.py) have
no per-round lists; they carry target_forwards and accepted_draft totals instead. The specmesh
speculative systems add round_tree_size (nodes verified per round; the first round is the prefill's
token) and plan: what the speculation planner chose for this prompt's rounds (PLAN_SUMS, summed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

SYSTEMS = ("hf_greedy", "hf_assisted", "specmesh_ar", "specmesh_serial", "specmesh_mesh", "llamacpp_ar",
           "llamacpp_spec")
LLAMACPP_SYSTEMS = ("llamacpp_ar", "llamacpp_spec")
SERIAL_DEFAULT_DEPTH = 3  # `specmesh run`'s default; the mesh's default (0) times it at start-up
PLAN_SUMS = ("rounds", "subtree_size_sum", "tokens_per_round_sum", "round_ms_sum")  # a record's "plan"

Progress = Callable[[str, str], None]  # (kind: "tick" | "phase", text)


def _record(prompt: dict, output_ids: list[int], wall: float, arrivals: list[tuple[float, int, int]],
            target_forward_s: float | None, finish: str | None = None) -> dict:
    """arrivals: (seconds since request start, tokens in the round, draft tokens accepted)."""
    return {
        "question_id": prompt["question_id"],
        "category": prompt["category"],
        "prompt_tokens": len(prompt["ids"]),
        "output_ids": list(output_ids),
        "new_tokens": len(output_ids),
        "wall_s": wall,
        "ttft_s": next((t for t, n, _ in arrivals if n > 0), None),
        "round_tokens": [n for _, n, _ in arrivals],
        "round_accepted": [a for _, _, a in arrivals],
        "round_times_s": [t for t, _, _ in arrivals],
        "target_forward_s": target_forward_s,
        "finish": finish,
    }


def plan_delta(before: tuple | None, after: tuple | None) -> dict | None:
    """A prompt's share of a planner's running sums (PLAN_SUMS order); None without a planner."""
    if before is None or after is None:
        return None
    return {k: a - b for k, a, b in zip(PLAN_SUMS, after, before)}


def _set_threads(spec: dict) -> int:
    import torch

    threads = spec["threads"] or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def _run_prompts(spec: dict, progress: Progress, one: Callable[[dict, int], dict], label: str) -> list[dict]:
    """Warm up on the first prompt (not recorded), then every prompt in order."""
    prompts = spec["prompts"]
    progress("phase", f"{label}: warm-up")
    one(prompts[0], spec["warmup_tokens"])
    progress("tick", "")
    records = []
    for i, p in enumerate(prompts):
        progress("phase", f"{label}: prompt {i + 1}/{len(prompts)}")
        records.append(one(p, spec["max_new_tokens"]))
        progress("tick", "")
    return records


# ------------------------------------------------------------------------------------------ transformers

class _ArrivalStreamer:
    """A transformers streamer that only timestamps: the first put() is the prompt, each later one is
    a round (one token for greedy, the accepted tokens + 1 for assisted generation)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.seen_prompt = False
        self.arrivals: list[tuple[float, int, int]] = []

    def put(self, value: Any) -> None:
        now = time.perf_counter()
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        n = int(value.numel())
        self.arrivals.append((now - self.t0, n, max(0, n - 1)))

    def end(self) -> None:
        pass


class _ForwardTimer:
    """Wall time and count of a torch module's forward calls (hooks on the top-level module)."""

    def __init__(self, module: Any) -> None:
        self.total = 0.0
        self.calls = 0
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0


def _load_hf(path: str, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval()


def run_hf(spec: dict, progress: Progress, assisted: bool) -> dict:
    import torch

    from specmesh.services.runtime.loader import parse_dtype

    threads = _set_threads(spec)
    dtype = parse_dtype(spec["dtype"])
    t_load = time.perf_counter()
    target = _load_hf(spec["target_dir"], dtype)
    draft = _load_hf(spec["draft_dir"], dtype) if assisted else None
    load_s = time.perf_counter() - t_load
    timer = _ForwardTimer(target)
    eos = list(spec["eos_ids"])

    def one(prompt: dict, max_new: int) -> dict:
        ids = torch.tensor([prompt["ids"]], dtype=torch.long)
        kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                      max_new_tokens=max_new, eos_token_id=eos, pad_token_id=spec["pad_id"])
        if draft is not None:
            kwargs["assistant_model"] = draft
        timer.reset()
        t0 = time.perf_counter()
        streamer = _ArrivalStreamer(t0)
        with torch.inference_mode():
            out = target.generate(ids, streamer=streamer, **kwargs)
        wall = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        finish = "eos" if new and new[-1] in eos else "length"
        return _record(prompt, new, wall, streamer.arrivals, timer.total, finish)

    settings: dict[str, Any] = {"threads": threads, "dtype": spec["dtype"]}
    if draft is None:
        return {"records": _run_prompts(spec, progress, one, "hf_greedy"), "settings": settings, "load_s": load_s}
    sweep = []
    gc = draft.generation_config
    defaults = gc._get_default_generation_params() if hasattr(gc, "_get_default_generation_params") else {}
    for setting in spec["assist_tokens"]:
        if setting == "default":  # transformers' own assistant settings, left as they come
            k = gc.num_assistant_tokens or defaults.get("num_assistant_tokens", 20)
            schedule = gc.num_assistant_tokens_schedule or defaults.get("num_assistant_tokens_schedule", "constant")
            threshold = gc.assistant_confidence_threshold
            if threshold is None:
                threshold = defaults.get("assistant_confidence_threshold", 0.4)
            label = f"default (k={k}, {schedule}, confidence threshold {threshold})"
        else:  # exactly k draft tokens per round: constant schedule, no confidence early-stop
            k, schedule, threshold = int(setting), "constant", 0.0
            label = f"k={k}"
        saved = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold)
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = \
            k, schedule, threshold
        records = _run_prompts(spec, progress, one, f"hf_assisted {label.split(' (')[0]}")
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = saved
        sweep.append({"setting": label, "num_assistant_tokens": k, "num_assistant_tokens_schedule": schedule,
                      "assistant_confidence_threshold": threshold, "records": records})
    return {"sweep": sweep, "settings": settings, "load_s": load_s}


# ------------------------------------------------------------------------------------------ our runner

# How the specmesh systems load their models: these two functions are the only places that read the
# loading options (in-process, and as `specmesh up` flags for the mesh).

def load_specmesh_model(spec: dict, role: str) -> Any:
    from specmesh.models.weight_cache import load_runner
    from specmesh.services.runtime.loader import parse_dtype
    from specmesh.services.runtime.model_worker import prepare_weights

    model = load_runner(Path(spec[f"{role}_dir"]), spec.get("weights", "auto"), parse_dtype(spec["dtype"]),
                        max_positions=spec["context"] + 256)
    prepare_weights(model, spec.get("activations", "auto"))
    return model


def specmesh_model_flags(spec: dict) -> list[str]:
    return ["--target", spec["target_dir"], "--draft", spec["draft_dir"], "--dtype", spec["dtype"],
            "--weights", spec.get("weights", "auto"), "--activations", spec.get("activations", "auto")]


def run_specmesh_inprocess(spec: dict, progress: Progress, serial: bool) -> dict:
    from specmesh.services.runtime.tree_params import TreeParams
    from specmesh.services.runtime.engines import DecodeStats, generate_ar, generate_serial
    from specmesh.services.runtime.request import Request
    from specmesh.services.runtime.sampling import SamplingParams

    threads = _set_threads(spec)
    context = spec["context"]
    t_load = time.perf_counter()
    target = load_specmesh_model(spec, "target")
    draft = load_specmesh_model(spec, "draft") if serial else None
    load_s = time.perf_counter() - t_load
    t = spec["tree"]
    tree = TreeParams(width=t["width"], subtree_size=t["subtree_size"], depth=t["depth"] or SERIAL_DEFAULT_DEPTH) \
        if serial else None
    planner = None
    if serial and spec.get("plan", True):  # as the mesh's draft does by default (--no-plan: fixed size)
        from specmesh.services.runtime.speculation_planner import serial_planner

        progress("phase", "specmesh_serial: measuring cost curves")
        planner = serial_planner(target, draft, tree.width, tree.depth)

    def plan_sums() -> tuple | None:
        st = planner.stats if planner is not None else None
        return (st.rounds, st.size_sum, st.tokens_sum, st.step_ms_sum) if st is not None else None

    forward_s = [0.0]
    inner = target.forward

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        s = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            forward_s[0] += time.perf_counter() - s

    target.forward = timed_forward  # instance attribute: the sessions call self.model.forward(...)
    eos = tuple(spec["eos_ids"])

    def one(prompt: dict, max_new: int) -> dict:
        request = Request(list(prompt["ids"]), max_new, SamplingParams(), eos)
        stats = DecodeStats()
        forward_s[0] = 0.0
        planned_before = plan_sums()
        t0 = time.perf_counter()
        if serial:
            chunks = generate_serial(target, draft, request, context, tree, stats, planner)
        else:
            chunks = generate_ar(target, request, context, stats)
        out: list[int] = []
        arrivals = []
        accepted_before = 0
        for chunk in chunks:
            arrivals.append((time.perf_counter() - t0, len(chunk), stats.accepted_draft - accepted_before))
            accepted_before = stats.accepted_draft
            out.extend(chunk)
        wall = time.perf_counter() - t0
        rec = _record(prompt, out, wall, arrivals, forward_s[0], "eos" if out and out[-1] in eos else "length")
        if serial:
            rec["decode_stats"] = {"target_s": stats.target_s, "draft_s": stats.draft_s,
                                   "reroot_hits": stats.reroot_hits, "new_trees": stats.new_trees}
            rec["round_tree_size"] = [1, *stats.subtree_sizes]  # the first round is the prefill's token
            rec["plan"] = plan_delta(planned_before, plan_sums())
        return rec

    name = "specmesh_serial" if serial else "specmesh_ar"
    settings: dict[str, Any] = {"threads": threads, "dtype": spec["dtype"], "context": context}
    if tree is not None:
        settings["tree"] = {"width": tree.width, "subtree_size": tree.subtree_size, "depth": tree.depth}
        settings["planner"] = None if planner is None else {
            "verify_ms_by_rows": planner.curve.by_rows(), "draft_ms_per_round": planner.fixed_ms}
    return {"records": _run_prompts(spec, progress, one, name), "settings": settings, "load_s": load_s}


# ------------------------------------------------------------------------------------------ the mesh

def _peak_rss_kb(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def mesh_command(spec: dict, ready_file: str) -> list[str]:
    """`specmesh up` exactly as a user starts it, on free ports, without HTTP."""
    t, m = spec["tree"], spec["mesh"]
    return [sys.executable, "-m", "specmesh.clients.cli", "up", *specmesh_model_flags(spec), "--port", "0",
            "--http-port", "-1",
            "--ready-file", ready_file, "--log-level", m.get("log_level", "WARNING"),
            "--target-threads", str(m["target_threads"]), "--draft-threads", str(m["draft_threads"]),
            "--width", str(t["width"]), "--subtree-size", str(t["subtree_size"]), "--depth", str(t["depth"] or 0),
            "--max-context", str(spec["context"]), *([] if spec.get("plan", True) else ["--no-plan"])]


def _stop_mesh(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `specmesh up` stops its four services on SIGTERM
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_mesh(spec: dict, progress: Progress) -> dict:
    from specmesh.clients.sdk import Client

    workdir = Path(tempfile.mkdtemp(prefix="specmesh-bench-mesh-"))
    ready = workdir / "up.ready"
    progress("phase", "specmesh_mesh: starting the four services")
    t_load = time.perf_counter()
    proc = subprocess.Popen(mesh_command(spec, str(ready)), start_new_session=True)
    try:
        deadline = time.monotonic() + spec["mesh"].get("startup_timeout", 1200)
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"specmesh up exited with status {proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("specmesh up was not ready in time")
            time.sleep(0.2)
        info = json.loads(ready.read_text())
        load_s = time.perf_counter() - t_load
        client = Client(info["addr"])

        def plan_sums() -> tuple | None:
            shape = client.model_info().speculation
            p = shape.planner if shape is not None else None
            if p is None or not p.active:
                return None
            return (p.rounds, p.subtree_size_sum, p.tokens_per_round_sum, p.round_ms_sum)

        def one(prompt: dict, max_new: int) -> dict:
            out: list[int] = []
            arrivals = []
            tree_sizes = []
            verify_ms = []
            target_ms = 0.0
            planned_before = plan_sums()
            finish = None
            rounds_reported = None
            t0 = time.perf_counter()
            for chunk in client.generate(token_ids=prompt["ids"], max_tokens=max_new, temperature=0.0):
                now = time.perf_counter() - t0
                if chunk.token_ids:
                    arrivals.append((now, len(chunk.token_ids), chunk.accepted))
                    tree_sizes.append(chunk.tree_size)
                    verify_ms.append(chunk.target_ms)
                    target_ms += chunk.target_ms
                    out.extend(chunk.token_ids)
                if chunk.is_final:
                    finish = chunk.finish_reason
                    rounds_reported = chunk.usage.rounds if chunk.usage else None
            wall = time.perf_counter() - t0
            rec = _record(prompt, out, wall, arrivals, target_ms / 1000, finish)
            rec["round_tree_size"] = tree_sizes
            rec["round_verify_ms"] = verify_ms
            rec["usage_rounds"] = rounds_reported
            # The draft sizes a round when it hears the previous one verified, before the target
            # verifies it: by the final chunk every round of this prompt was planned.
            rec["plan"] = plan_delta(planned_before, plan_sums())
            return rec

        records = _run_prompts(spec, progress, one, "specmesh_mesh")
        speculation = client.model_info().speculation
        client.close()
        services = {name: _peak_rss_kb(pid) for name, pid in info.get("pids", {}).items()}
        mesh_info = {"ready": {k: v for k, v in info.items() if k != "services"}, "peak_rss_kb": services,
                     "speculation": dataclasses.asdict(speculation) if speculation is not None else None}
    finally:
        _stop_mesh(proc)
    from specmesh.clients.up_cmd import thread_split

    target_threads, draft_threads = thread_split(spec["mesh"]["target_threads"], spec["mesh"]["draft_threads"])
    settings = {"dtype": spec["dtype"], "command": mesh_command(spec, "<ready-file>")[2:],
                "target_threads": target_threads, "draft_threads": draft_threads,
                "tree": dict(spec["tree"]), "services": mesh_info}
    return {"records": records, "settings": settings, "load_s": load_s,
            "peak_rss_kb_services": {k: v for k, v in services.items() if v is not None}}


def run_system(spec: dict, progress: Progress) -> dict:
    name = spec["system"]
    if name == "hf_greedy":
        return run_hf(spec, progress, assisted=False)
    if name == "hf_assisted":
        return run_hf(spec, progress, assisted=True)
    if name == "specmesh_ar":
        return run_specmesh_inprocess(spec, progress, serial=False)
    if name == "specmesh_serial":
        return run_specmesh_inprocess(spec, progress, serial=True)
    if name == "specmesh_mesh":
        return run_mesh(spec, progress)
    if name in LLAMACPP_SYSTEMS:
        from .llamacpp import run_llamacpp

        return run_llamacpp(spec, progress, speculative=name == "llamacpp_spec")
    raise ValueError(f"unknown system {name!r}")
