"""Argument groups and model-pair loading shared by the CLI commands."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def fail(message: str) -> int:
    """One line on stderr, exit code 2: the CLI's only way to report a user error."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="target model: directory or .gguf (default: the default pair)")
    p.add_argument("--draft", default=None, help="draft model: directory or .gguf (default: the default pair)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random model pair (smoke tests)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    add_weights_argument(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--context", type=int, default=4096, help="context length (prompt + generated tokens)")


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    from specmesh.services.runtime.weight_formats import ACTIVATIONS, WEIGHT_FORMATS

    p.add_argument("--weights", default="auto", choices=WEIGHT_FORMATS,
                   help="projection weights: gguf (the GGUF's own quantization), bf16, int8, int4; "
                        "auto = gguf for GGUF models on CPU, else bf16")
    p.add_argument("--activations", default="auto", choices=ACTIVATIONS,
                   help="activations of the quantized kernels: int8 (per 32 columns, as llama.cpp's Q8_0; "
                        "faster at several rows), exact; auto = int8 in bf16 on CPU, else exact")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def sampling_from_args(args: argparse.Namespace) -> Any:
    from specmesh.services.runtime.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)


def tiny_pair_dirs() -> tuple[Path, Path]:
    from specmesh.models.store import default_cache_dir
    from specmesh.models.tiny import make_tiny_pair

    return make_tiny_pair(default_cache_dir() / "tiny")


def model_dirs(args: argparse.Namespace, need_draft: bool = True) -> tuple[Path, Path | None]:
    from specmesh.models.store import resolve_model_dir

    if args.tiny:
        return tiny_pair_dirs()
    target = resolve_model_dir(args.target, "target")
    draft = resolve_model_dir(args.draft, "draft") if need_draft else None
    return target, draft


@dataclass
class LoadedPair:
    target: Any
    draft: Any | None
    tokenizer: Any
    eos_ids: tuple[int, ...]


def resolve_pair(args: argparse.Namespace, need_draft: bool = True) -> LoadedPair:
    """Resolve, load and cross-check the target (and draft) for in-process use."""
    import torch

    from specmesh.models.weight_cache import load_runner
    from specmesh.services.runtime.model_worker import prepare_weights
    from specmesh.services.runtime.loader import check_pair, load_tokenizer, parse_dtype

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    target_dir, draft_dir = model_dirs(args, need_draft)
    dtype = parse_dtype(args.dtype)
    tokenizer = load_tokenizer(target_dir)
    target = load_runner(target_dir, args.weights, dtype, max_positions=args.context + 256)
    draft = None
    if draft_dir is not None:
        draft = load_runner(draft_dir, args.weights, dtype, max_positions=args.context + 256)
        check_pair(tokenizer, load_tokenizer(draft_dir), target.vocab_size, draft.vocab_size)
    for model in (target, draft):
        if model is not None:
            prepare_weights(model, args.activations)
    return LoadedPair(target, draft, tokenizer, eos_ids(tokenizer, target_dir))


def eos_ids(tokenizer: Any, model_dir: Path) -> tuple[int, ...]:
    from specmesh.services.runtime.loader import read_generation_defaults

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = read_generation_defaults(model_dir).get("eos_token_id")
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return tuple(sorted(ids))


def prompt_ids(tokenizer: Any, prompt: str, raw: bool = False) -> list[int]:
    from specmesh.services.runtime.errors import InvalidRequest

    if not prompt:
        raise InvalidRequest("prompt is empty")
    if raw:
        return tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
