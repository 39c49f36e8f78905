"""Shared fixtures: tiny random model pairs made on the fly (once per test session) and helpers.

- `tiny_pair` / `tiny_llama_pair`: (target_dir, draft_dir) saved checkpoints + byte tokenizer
  (`specmesh.models.tiny.make_tiny_pair`): a 2-layer Qwen2 target with a noisy-copy Qwen2
  draft, or with a 1-layer Llama draft of another size. Both share the target (same seed).
- `tiny_target`, `tiny_draft`, `tiny_llama_draft`: those checkpoints loaded as fp32 runtime
  Transformers; `tiny_hf_target`: the target as a transformers model (fp32, eval), the reference.
- `make_hf_model`: build an in-memory transformers model of any supported shape plus its runtime
  Transformer, without touching the disk (tied heads, GQA, tiny vocabularies, ...).
- `single_thread`: run a test with one torch thread (tiny models are faster that way, and the
  timing does not depend on what else runs on the machine).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the C++ CPU kernels (kernels/cpu_extension.py) once, before any test: every model
    forward on CPU runs the attention kernel, and a first build (about a minute) inside a service
    under test would eat the start-up time its test allows."""
    from specmesh.kernels.int4_gemm import cpu as int4_cpu
    from specmesh.kernels.tree_attention import cpu as attention_cpu

    int4_cpu.available()
    attention_cpu.available()


@pytest.fixture(scope="module")
def quant_kernel() -> None:
    """Skip, saying why, where specmesh's int4/int8 CPU kernels cannot be built."""
    from specmesh.kernels.int4_gemm import cpu as int4_cpu

    if not int4_cpu.available():
        pytest.skip(int4_cpu.unavailable_reason())


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target_dir, draft_dir): Qwen2 target, draft = target weights + noise (same vocab, 260)."""
    from specmesh.models.tiny import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("tiny_pair"))


@pytest.fixture(scope="session")
def tiny_llama_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target_dir, draft_dir): the same Qwen2 target, draft = a smaller random 1-layer Llama."""
    from specmesh.models.tiny import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("tiny_llama_pair"), draft_arch="llama")


@pytest.fixture(scope="session")
def tiny_target(tiny_pair: tuple[Path, Path]) -> Any:
    from specmesh.services.runtime.loader import load_transformer

    return load_transformer(tiny_pair[0], torch.float32)


@pytest.fixture(scope="session")
def tiny_draft(tiny_pair: tuple[Path, Path]) -> Any:
    from specmesh.services.runtime.loader import load_transformer

    return load_transformer(tiny_pair[1], torch.float32)


@pytest.fixture(scope="session")
def tiny_llama_draft(tiny_llama_pair: tuple[Path, Path]) -> Any:
    from specmesh.services.runtime.loader import load_transformer

    return load_transformer(tiny_llama_pair[1], torch.float32)


@pytest.fixture(scope="session")
def tiny_hf_target(tiny_pair: tuple[Path, Path]) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32, local_files_only=True)
    model.generation_config.eos_token_id = None  # tests decode a fixed number of tokens
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_pair: tuple[Path, Path]) -> Any:
    from specmesh.services.runtime.loader import load_tokenizer

    return load_tokenizer(tiny_pair[0])


def _make_hf_model(arch: str = "qwen2", *, seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2,
                   heads: int = 4, kv_heads: int = 2, lm_head_scale: float = 4.0,
                   **config: Any) -> tuple[Any, Any]:
    from specmesh.services.runtime.loader import transformer_from_state_dict
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    settings = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                    tie_word_embeddings=False, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    settings.update(config)
    cfg = cls(**settings)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        # Random init gives nearly uniform logits; sharpen them so greedy ties are implausible and
        # sampled distributions are uneven (like a real LM). With tied heads this scales the embedding.
        hf.get_output_embeddings().weight.mul_(lm_head_scale)
        for name, p in hf.named_parameters():  # visible biases, so a dropped bias cannot go unnoticed
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.5)
    hf.generation_config.eos_token_id = None
    return hf, transformer_from_state_dict(cfg, hf.state_dict(), torch.float32)


@pytest.fixture(scope="session")
def make_hf_model() -> Callable[..., tuple[Any, Any]]:
    """make_hf_model(arch="qwen2"|"llama", seed=, vocab=, hidden=, layers=, heads=, kv_heads=,
    lm_head_scale=, **config overrides) -> (transformers model fp32 eval, runtime Transformer fp32)."""
    return _make_hf_model


@pytest.fixture
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
