"""The runner's weights in the format `--weights` asks for, repacked once and cached.

Repacking a GGUF (decoding its blocks, fusing q/k/v and gate/up, packing for the int4 kernel) takes
about a minute for the 1.5B target; reading the result back takes seconds. The cache holds one
safetensors file per (model, format, dtype, tensor-parallel shard, torch version), written to a
temporary name and renamed, under the store's lock, so concurrent starts never see half a file.

    $SPECMESH_CACHE/weights/<model>-<format>-<dtype>-tp<rank>of<size>-<hash>.safetensors (+ .json)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from specmesh.kernels import int4_gemm
from specmesh.services.runtime.errors import ModelError
from specmesh.services.runtime.loader import (load_transformer, read_model_config, runner_state,
                                              transformer_from_runner_state)
from specmesh.services.runtime.model import Transformer

from . import store

log = logging.getLogger(__name__)

#: Bump when the repacked layout changes (the key includes it and torch's version, whose int4
#: kernel defines the packed layout).
CACHE_FORMAT = 1


def resolve_weights(weights: str, model_dir: str | os.PathLike[str], device: str) -> str:
    """`--weights auto`: the GGUF's own quantization on CPU when the model came from a GGUF, else bf16."""
    if weights != "auto":
        return weights
    if not str(device).startswith("cpu"):
        return "bf16"
    return "gguf" if store.gguf_origin(model_dir) is not None else "bf16"


def load_runner(model_dir: Path, weights: str, dtype: torch.dtype, device: str = "cpu", tp_rank: int = 0,
                tp_size: int = 1, tp_group: Any = None, max_positions: int | None = None, keep_dense: bool = True,
                cache_dir: Path | None = None, progress: bool = True) -> Transformer:
    """Load `model_dir` (see store.resolve_model_dir) with its projections in format `weights`."""
    model_dir = Path(model_dir)
    weights = resolve_weights(weights, model_dir, device)
    kwargs: dict[str, Any] = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group, max_positions=max_positions)
    if weights == "bf16":  # the dense checkpoint is the format: nothing to repack
        return load_transformer(model_dir, dtype, device, weights="bf16", **kwargs)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else store.default_cache_dir()
    key = _key(model_dir, weights, dtype, tp_rank, tp_size, keep_dense)
    path = cache / "weights" / f"{key}.safetensors"
    config = read_model_config(model_dir)
    if not _complete(path):
        with store._locked(cache, key, f"{model_dir.name} weights", progress):
            if not _complete(path):
                _build(path, model_dir, weights, dtype, tp_rank, tp_size, keep_dense, cache, progress)
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    manifest = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(path, device=str(device))
    model = transformer_from_runner_state(config, tensors, manifest["weights"], **kwargs)
    log.info("read %s weights of %s in %.1fs", weights, model_dir.name, time.perf_counter() - t0)
    return model


def _build(path: Path, model_dir: Path, weights: str, dtype: torch.dtype,
           tp_rank: int, tp_size: int, keep_dense: bool, cache: Path, progress: bool) -> None:
    from safetensors.torch import save_file

    from .gguf_weights import GGUFWeights

    t0 = time.perf_counter()
    store._say(progress, f"repacking {model_dir.name} as {weights} weights (one time)...")
    with store.source_gguf(model_dir, cache, progress) as gguf_path:
        source = None
        if weights == "gguf":
            if gguf_path is None:
                raise ModelError(f"--weights gguf needs a GGUF model, and {model_dir} is a dense checkpoint; "
                                 f"use --weights bf16, int8 or int4")
            source = GGUFWeights(gguf_path, read_model_config(model_dir))
        model = load_transformer(model_dir, dtype, "cpu", tp_rank, tp_size, None, weights=weights,
                                 keep_dense=keep_dense, source=source, progress=progress)
    tensors, manifest = runner_state(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        info = {"weights": manifest, "format": weights, "model_dir": str(model_dir), "torch": torch.__version__,
                "repack_seconds": round(time.perf_counter() - t0, 1),
                "gguf_types": sorted(set(source.types().values())) if source is not None else None}
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))  # the manifest before the data...
        os.replace(tmp, path)  # ...so a complete .safetensors always has its manifest
    finally:
        tmp.unlink(missing_ok=True)
    store._say(progress, f"repacked {model_dir.name} in {time.perf_counter() - t0:.0f} s -> {path}")


def _complete(path: Path) -> bool:
    return path.is_file() and path.with_suffix(".json").is_file()


def _key(model_dir: Path, weights: str, dtype: torch.dtype, tp_rank: int, tp_size: int, keep_dense: bool) -> str:
    # The directory's config and weight files (path, size, mtime) identify the model without hashing gigabytes.
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    ident = "\0".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    # The int4 layout depends on whether specmesh's kernel builds here (else ATen's, per torch version).
    layout = "tiles" if int4_gemm.available() else f"aten-{torch.__version__}"
    ident += f"\0{weights}\0{dtype}\0{tp_rank}/{tp_size}\0{keep_dense}\0{layout}\0{CACHE_FORMAT}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    dt = str(dtype).removeprefix("torch.")
    return f"{store._slug(model_dir.name)}-{weights}-{dt}-tp{tp_rank}of{tp_size}{'-dense' if keep_dense else ''}-{digest}"
