"""What draft- and target-service share: their flags, loading the model, making its KV pool."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch

from specmesh.kernels.tree_attention import cpu as attention_cpu

from .errors import ModelError
from .kv_pool import KVPool
from .loader import parse_dtype
from .model import Transformer
from .prefix_cache import SessionPool
from .quant import calibrate_kernel_rows, use_int8_activations
from .weight_formats import ACTIVATIONS

log = logging.getLogger("specmesh.worker")


@dataclasses.dataclass
class ModelServiceConfig:
    """Flags both model services have (mixed into their config dataclasses)."""

    model: str = dataclasses.field(default="", metadata={"help": "model directory or .gguf ('' = default pair)"})
    dtype: str = dataclasses.field(default="bf16", metadata={"help": "bf16 or fp32"})
    threads: int = dataclasses.field(default=0, metadata={"help": "torch threads (0 = torch's default)"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    pool_blocks: int = dataclasses.field(default=1024, metadata={"help": "KV pool size in blocks (reported to "
                                                                          "treekv, which admits sessions by it)"})
    block_size: int = dataclasses.field(default=16, metadata={"help": "KV slots per block"})
    max_context: int = dataclasses.field(default=4096, metadata={"help": "positions the model may reach"})
    weights: str = dataclasses.field(default="auto", metadata={
        "help": "projection weight format: gguf (the GGUF's own quantization, repacked for the CPU int4/int8 "
                "kernels) | bf16 (dense) | int8 | int4 (quantized on load) | auto (gguf for a GGUF model on "
                "CPU, else bf16)"})
    activations: str = dataclasses.field(default="auto", metadata={
        "help": "activations of the quantized-weight kernels: int8 (quantized per row and 32 columns, as "
                "llama.cpp's Q8_0, and multiplied in exact integers: about 2x faster on the default target) | exact "
                "(the dtype's own) | auto (int8 in bf16; exact in fp32, the exactness mode of the tests)"})
    prefill_dense: bool = dataclasses.field(default=True, metadata={
        "help": "keep a dense copy of quantized weights for many-row forwards (prefill): about 2x faster "
                "prefill for about 2 bytes per parameter of memory"})
    step_rows: int = dataclasses.field(default=512, metadata={"help": "most rows one batched forward runs "
                                                                       "(all sessions' trees + prefill chunks)"})
    prefill_chunk: int = dataclasses.field(default=256, metadata={"help": "prompt tokens per prefill chunk: a new "
                                                                          "prompt delays running sessions by at "
                                                                          "most one chunk"})


def load_service_model(cfg: ModelServiceConfig, role: str, tp_rank: int = 0, tp_size: int = 1,
                       tp_group: object | None = None) -> tuple[Transformer, Path]:
    from specmesh.models.store import resolve_model_dir
    from specmesh.models.weight_cache import load_runner, resolve_weights

    check_activations(cfg.activations)  # before minutes of loading
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model_dir = resolve_model_dir(cfg.model or None, role)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    weights = resolve_weights(cfg.weights, model_dir, cfg.device)
    model = load_runner(model_dir, weights, parse_dtype(cfg.dtype), cfg.device, tp_rank, tp_size, tp_group,
                        max_positions=cfg.max_context + 256, keep_dense=cfg.prefill_dense)
    log.info("%s model %s loaded in %.1fs (%s, weights %s, %d threads)", role, model_dir, time.perf_counter() - t0,
             cfg.dtype, weights, torch.get_num_threads())
    prepare_weights(model, cfg.activations)
    return model, model_dir


def service_pool(model: Transformer, cfg: ModelServiceConfig, label: str, record: bool = False) -> SessionPool:
    """The service's KV pool (label "draft" / "target"); `record`: keep ops for tensor-parallel followers."""
    return SessionPool(KVPool.for_model(model, cfg.pool_blocks, cfg.block_size, f"{label} pool", record), label)


def prepare_weights(model: Transformer, activations: str = "auto") -> None:
    """What every loader of a serving model runs once loaded: build the C++ CPU kernels, pick the
    quantized kernels' activations (`ModelServiceConfig.activations`), then calibrate their row
    crossovers."""
    check_activations(activations)
    if model.device.type == "cpu":  # built (or loaded) now, not on the first request's forward
        attention_cpu.available()
    cpu_bf16 = model.dtype == torch.bfloat16 and model.device.type == "cpu"
    if activations == "int8" or (activations == "auto" and cpu_bf16):
        switched = use_int8_activations(model_weights(model))
        log.info("%d quantized weights take int8 activations (--activations %s)", switched, activations)
    calibrate_weights(model)


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ModelError(f"unknown activations '{activations}' (use {', '.join(ACTIVATIONS)})")


def model_weights(model: Transformer) -> list:
    """Every projection weight of the model, the LM head last."""
    return [*(w for layer in model.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)), model.lm_head]


def calibrate_weights(model: Transformer) -> dict[str, int]:
    """Measure, per quantized shape, up to how many rows its kernel beats its dense copy (quant.py).

    Only in bf16: fp32 is the exactness mode of the tests, where every process must pick the same
    paths as the in-process reference it is compared with (the defaults), not a timing's.
    """
    if model.dtype != torch.bfloat16:
        return {}
    chosen = calibrate_kernel_rows(model_weights(model))
    if chosen:
        log.info("weight-only kernels serve up to %s rows (dense copies above)", chosen)
    return chosen


def instance_id() -> str:
    return f"{os.getpid()}-{time.time_ns()}"
