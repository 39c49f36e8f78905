"""Quantized weights in the one runner: GGUF blocks repacked for the CPU int4/int8 kernels.

- every repacked format against the gguf package's own dequantization (stated tolerances);
- the kernels against a dense matmul of the same values, at every row count they serve;
- a tiny model written as a real GGUF (gguf's writer and quantizers), converted by transformers,
  loaded with `--weights gguf` through the cache;
- lossless: with those weights, serial tree speculation and the mesh (real processes) give exactly
  the target-only output in fp32, for several tree shapes and with fully rejected trees, with the
  kernels' exact activations and with Q8 (int8) activations.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from specmesh.models import weight_cache
from specmesh.models.gguf_weights import GGUFWeights, decode_int4
from specmesh.models.store import resolve_model_dir
from specmesh.models.tiny import make_tiny_pair, write_tiny_gguf
from specmesh.services.runtime.engines import DecodeStats, generate_ar, generate_serial
from specmesh.services.runtime.request import Request
from specmesh.services.runtime.errors import ModelError
from specmesh.services.runtime.loader import load_transformer, read_model_config
from specmesh.kernels import int4_gemm
from specmesh.services.runtime.model_worker import check_activations, model_weights
from specmesh.services.runtime.quant import (Int4Groups, Int4Weight, Int8Weight, calibrate_kernel_rows, dequantize,
                                             int4_groups_from_dense, linear, pack_int4, quantize_int8,
                                             use_int8_activations, weight_from_tensors, weight_tensors)
from specmesh.services.runtime.tree_params import TreeParams

from runner_testing import run_rows


gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

QT = gguf.GGMLQuantizationType


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random raw blocks of a K-quant type (gguf cannot quantize these), with sane f16 super-scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[QT[qtype]]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    heads = {"Q4_K": [0, 2], "Q6_K": [size - 2]}[qtype]  # offsets of the f16 scales in a block
    for off in heads:
        raw[:, off:off + 2] = np.float16(rng.uniform(0.001, 0.01, raw.shape[0])).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def quantized(qtype: str, n: int = 64, k: int = 256, seed: int = 0) -> np.ndarray:
    if qtype in ("Q4_K", "Q6_K"):
        return random_blocks(qtype, n, k, seed)
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    return gguf_quantize(w, QT[qtype])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_exact_4bit_types_repack_without_loss(qtype: str) -> None:
    """Q4_0 / Q4_1 / Q4_K blocks are (q - 8) * scale + zero groups: the repack is exact in fp32."""
    data = quantized(qtype)
    ref = gguf_dequantize(data, QT[qtype]).reshape(64, 256)
    groups = decode_int4(qtype, data, 64, 256)
    assert np.abs(groups.dequantize().numpy() - ref).max() <= 1e-6 * np.abs(ref).max()
    packed = pack_int4(groups, torch.float32, keep_dense=False)
    assert np.abs(dequantize(packed).numpy() - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("qtype,fmt", [("Q5_0", "int4"), ("Q5_1", "int4"), ("Q8_0", "int8"), ("Q6_K", "int8")])
def test_requantized_types_stay_within_half_a_step(qtype: str, fmt: str) -> None:
    """Other types are re-quantized: within half a quantization step of gguf's dequantization."""
    n, k = 64, 256
    ref = torch.from_numpy(gguf_dequantize(quantized(qtype, n, k), QT[qtype]).reshape(n, k).copy())
    if fmt == "int4":
        w = pack_int4(int4_groups_from_dense(ref), torch.float32, keep_dense=False)
        g = ref.view(n, k // 32, 32)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, dim=1)
    else:
        w = quantize_int8(ref, torch.float32)
        step = (ref.abs().amax(1, keepdim=True) / 127).expand(n, k)
    err = (dequantize(w) - ref).abs()
    assert (err <= step / 2 + 1e-6).all(), float((err - step / 2).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_a_dense_matmul_of_the_same_values(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dense = torch.randn(128, 256)
    weights = [pack_int4(int4_groups_from_dense(dense), dtype, keep_dense=True), quantize_int8(dense, dtype, True)]
    for w in weights:
        values = dequantize(w).float()
        assert torch.equal(w.dense, dequantize(w))  # the dense copy holds the kernel's values
        for rows in (1, 2, w.kernel_max_rows, w.kernel_max_rows + 1, 40):
            x = torch.randn(rows, 256).to(dtype)
            ref = x.float() @ values.t()
            # fp32: specmesh's int4 kernel multiplies fp32 activations as two bf16 halves (~16 bits)
            tol = (3e-5 if dtype == torch.float32 else 0.05) * ref.abs().max()
            assert (linear(x, w).float() - ref).abs().max() <= tol, (type(w).__name__, rows)


def test_int8_activations_switch_both_kernels_and_keep_the_cache_format() -> None:
    if not int4_gemm.available():
        pytest.skip(int4_gemm.unavailable_reason())
    torch.manual_seed(1)
    dense = torch.randn(128, 256)
    w4, w8 = pack_int4(int4_groups_from_dense(dense), torch.float32, keep_dense=False), quantize_int8(dense, torch.float32)
    values = [dequantize(w).clone() for w in (w4, w8)]
    q8 = w8.q.clone()
    x = torch.randn(5, 256)
    assert use_int8_activations([w4, w8, dense]) == 2  # a dense weight stays as it is
    assert w4.int8_activations and w8.q is None and w8.tiles is not None
    for w, v in zip((w4, w8), values):
        assert torch.equal(dequantize(w), v)  # the same weights, only the activations change
        ref = x @ v.t()
        y = linear(x, w)
        assert 0 < (y - ref).abs().max() < 0.03 * ref.abs().max()
        assert torch.equal(y[2:3], linear(x[2:3], w))
    tensors, meta = weight_tensors("w", w8)
    assert torch.equal(tensors["w.q"], q8)  # the repacked-weights cache keeps ATen's int8 layout
    assert torch.equal(dequantize(weight_from_tensors("w", tensors, meta)), values[1])
    with pytest.raises(ModelError, match="unknown activations 'int4'"):
        check_activations("int4")


def test_weights_read_back_at_unaligned_offsets_are_realigned() -> None:
    """safetensors places tensors at any byte offset; ATen's int8 kernel faulted (SIGSEGV) on them."""
    w8 = quantize_int8(torch.randn(64, 256), torch.float32)
    tensors, meta = weight_tensors("w", w8)
    raw = torch.empty(tensors["w.q"].numel() + 64, dtype=torch.int8)
    offset = 24 - raw.data_ptr() % 64 + (64 if raw.data_ptr() % 64 > 24 else 0)  # a pointer at 24 mod 64
    unaligned = raw[offset:offset + tensors["w.q"].numel()].view_as(tensors["w.q"])
    unaligned.copy_(tensors["w.q"])
    assert unaligned.data_ptr() % 64 == 24
    back = weight_from_tensors("w", {**tensors, "w.q": unaligned}, meta)
    assert back.q.data_ptr() % 64 == 0 and torch.equal(back.q, w8.q)
    x = torch.randn(3, 256)
    assert torch.equal(linear(x, back), linear(x, w8))


def test_calibration_sets_a_crossover_per_shape() -> None:
    a, b = (pack_int4(int4_groups_from_dense(torch.randn(n, 256)), torch.float32, keep_dense=True) for n in (64, 128))
    c = quantize_int8(torch.randn(64, 256), torch.float32)  # no dense copy: the kernel serves every row count
    chosen = calibrate_kernel_rows([a, b, c], rows=(2, 4, 8, 16), repeats=1, floor=2)
    assert set(chosen) == {"int4 64x256", "int4 128x256"}
    assert a.kernel_max_rows == chosen["int4 64x256"] in (2, 4, 8, 16)
    assert c.kernel_max_rows == 8
    x = torch.randn(3, 256)
    assert torch.allclose(linear(x, a), x @ dequantize(a).t(), atol=1e-4)


def test_int4_groups_shard_on_group_boundaries() -> None:
    g = int4_groups_from_dense(torch.randn(32, 128))
    assert torch.equal(Int4Groups.cat([g.rows(0, 16), g.rows(16, 32)]).dequantize(), g.dequantize())
    assert torch.equal(g.columns(64, 128).dequantize(), g.dequantize()[:, 64:])
    with pytest.raises(ValueError, match="groups"):
        g.columns(0, 48)


# -- a tiny model as a real GGUF --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("gguf_pair")
    target, draft = make_tiny_pair(base / "dense")
    _t2, llama = make_tiny_pair(base / "dense_llama", seed=7, draft_arch="llama")
    files = {"target": write_tiny_gguf(target, base / "target.gguf"),
             "draft": write_tiny_gguf(draft, base / "draft.gguf"),
             "llama": write_tiny_gguf(llama, base / "llama.gguf")}
    cache = base / "cache"
    dirs = {name: resolve_model_dir(path, "target", cache_dir=cache, progress=False) for name, path in files.items()}
    return {"files": files, "dirs": dirs, "cache": cache, "base": base}


def load(pair: dict[str, Any], name: str, weights: str = "gguf", **kwargs: Any) -> Any:
    return weight_cache.load_runner(pair["dirs"][name], weights, torch.float32, cache_dir=pair["cache"],
                                    progress=False, **kwargs)


def test_gguf_loaded_weights_equal_gguf_dequantization(gguf_pair: dict[str, Any]) -> None:
    """The runner's projections hold gguf's dequantized values: exact for Q4_0/Q4_1, within half a step for int8."""
    model = load(gguf_pair, "target", keep_dense=False)
    reader = GGUFWeights(gguf_pair["files"]["target"], read_model_config(gguf_pair["dirs"]["target"]))
    raw = {t.name: t for t in gguf.GGUFReader(gguf_pair["files"]["target"]).tensors}

    def ref(name: str) -> torch.Tensor:
        t = raw[name]
        n, k = reversed(t.shape.tolist())
        return torch.from_numpy(gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(int(n), int(k)).copy())

    layer = model.layers[0]
    # gate (Q4_0) and up (Q5_0 -> int4 min/max): int4; gate's half is exact.
    assert isinstance(layer.gate_up, Int4Weight)
    ff = model.config.intermediate_size
    assert torch.allclose(dequantize(layer.gate_up)[:ff], ref("blk.0.ffn_gate.weight"), atol=1e-6)
    # o (Q4_0) exact; down (Q4_1) exact.
    assert torch.allclose(dequantize(layer.o), ref("blk.0.attn_output.weight"), atol=1e-6)
    assert torch.allclose(dequantize(layer.down), ref("blk.0.ffn_down.weight"), atol=1e-6)
    # q (Q4_0) + k (Q4_1) + v (Q8_0): one part is 8-bit, so the fused qkv is int8.
    assert isinstance(layer.qkv, Int8Weight)
    fused = torch.cat([ref(f"blk.0.attn_{p}.weight") for p in "qkv"])
    step = fused.abs().amax(1, keepdim=True) / 127
    assert ((dequantize(layer.qkv) - fused).abs() <= step / 2 + 1e-6).all()
    assert reader.types()["blk.0.attn_v.weight"] == "Q8_0"


def test_llama_gguf_rows_are_unpermuted(gguf_pair: dict[str, Any]) -> None:
    """llama.cpp's converter permutes llama q/k rows; the runner must see transformers' order."""
    dense = load_transformer(gguf_pair["dirs"]["llama"], torch.float32)  # transformers un-permutes on load
    quant = load(gguf_pair, "llama", weights="gguf", keep_dense=False)
    x = torch.randn(1, dense.config.hidden_size)
    for a, b in zip(dense.layers, quant.layers):
        assert torch.allclose(linear(x, a.qkv), linear(x, b.qkv), atol=0.02 * linear(x, a.qkv).abs().max())


def test_second_load_reads_the_cache(gguf_pair: dict[str, Any]) -> None:
    first = load(gguf_pair, "draft")
    files = sorted((gguf_pair["cache"] / "weights").glob("*draft*gguf*.safetensors"))
    assert files, list((gguf_pair["cache"] / "weights").iterdir())
    stamp = [f.stat().st_mtime_ns for f in files]
    second = load(gguf_pair, "draft")
    assert [f.stat().st_mtime_ns for f in files] == stamp  # not rebuilt
    assert json.loads(files[0].with_suffix(".json").read_text())["format"] == "gguf"
    outs = [run_rows(m, [5, 6, 7], m.new_cache(8)) for m in (first, second)]
    assert torch.equal(outs[0], outs[1])


def test_weight_format_errors_are_one_line(gguf_pair: dict[str, Any]) -> None:
    dense_dir = gguf_pair["base"] / "dense" / "target"
    with pytest.raises(ModelError, match="--weights gguf needs a GGUF model"):
        weight_cache.load_runner(dense_dir, "gguf", torch.float32, cache_dir=gguf_pair["cache"], progress=False)
    with pytest.raises(ModelError, match="unknown weight format 'int3'"):
        load_transformer(dense_dir, torch.float32, weights="int3")
    assert weight_cache.resolve_weights("auto", gguf_pair["dirs"]["target"], "cpu") == "gguf"
    assert weight_cache.resolve_weights("auto", dense_dir, "cpu") == "bf16"
    assert weight_cache.resolve_weights("auto", gguf_pair["dirs"]["target"], "cuda") == "bf16"


# -- lossless with quantized weights -------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 45, 200, 7, 7, 7], [42], list(range(60, 90))]
SHAPES = [TreeParams(1, 1, 1), TreeParams(2, 4, 2), TreeParams(4, 16, 4), TreeParams(3, 6, 5, max_tree=8)]


def with_activations(model: Any, activations: str) -> Any:
    """`model` with Q8 activations in every quantized kernel. Its dense copies (prompt rows past
    `kernel_max_rows`) compute with exact activations, far from Q8's numbers: a tree wider than
    that must still take the kernels to equal one-row decoding (ForwardBatch.token_rows)."""
    if activations == "int8":
        if not int4_gemm.available():
            pytest.skip(int4_gemm.unavailable_reason())
        assert use_int8_activations(model_weights(model)) > 0
    return model


@pytest.mark.parametrize("activations", ["exact", "int8"])
@pytest.mark.parametrize("weights", ["gguf", "int4"])
def test_serial_speculation_equals_ar_with_quantized_weights(gguf_pair: dict[str, Any], weights: str,
                                                             activations: str, single_thread: None) -> None:
    target = with_activations(load(gguf_pair, "target", weights), activations)
    drafts = {"noisy": load(gguf_pair, "draft", weights), "llama (rejected)": load(gguf_pair, "llama", weights)}
    drafts = {name: with_activations(d, activations) for name, d in drafts.items()}
    rejected = 0
    for prompt in PROMPTS:
        ref = sum(generate_ar(target, Request(prompt, 40), 512), [])
        for name, draft in drafts.items():
            for tree in SHAPES:
                out: list[int] = []
                for chunk in generate_serial(target, draft, Request(prompt, 40), 512, tree):
                    out += chunk
                assert out == ref, (name, tree, prompt)
        stats = DecodeStats()
        list(generate_serial(target, drafts["llama (rejected)"], Request(prompt, 40), 512, SHAPES[2], stats))
        accepting = stats.accepted_per_depth[0] if stats.accepted_per_depth else 0
        rejected += stats.rounds - 1 - accepting  # rounds (after the prefill) that accepted nothing
    assert rejected > 0


@pytest.fixture(scope="module")
def gguf_mesh(gguf_pair: dict[str, Any]) -> Iterator[Any]:
    from router_testing import serve_mesh

    env = {"SPECMESH_CACHE": str(gguf_pair["cache"])}
    fp32 = ["--dtype", "fp32", "--weights", "gguf"]
    yield from serve_mesh(gguf_pair["base"] / "mesh", pair=(gguf_pair["files"]["target"], gguf_pair["files"]["llama"]),
                          target_args=[*fp32, "--tp", "2", "--verify-delay-ms", "10"],
                          # the draft sends trees the target rejects; its numerics cannot change the
                          # output, so it runs the Q8 kernels (the bf16 default) in a real process
                          draft_args=[*fp32, "--activations", "int8", "--expand-delay-ms", "5", "--no-plan"],
                          env=env)


def test_mesh_with_gguf_weights_and_tp2_target_equals_target_only(gguf_pair: dict[str, Any], gguf_mesh: Any) -> None:
    from test_mesh_lossless import stream, tokens_of

    target = load(gguf_pair, "target")
    speculative = rejected = 0
    for prompt in PROMPTS:
        responses = stream(gguf_mesh.router.addr, prompt, 40)
        assert tokens_of(responses) == sum(generate_ar(target, Request(prompt, 40), 2048), []), prompt
        chunks = [r.chunk for r in responses if r.HasField("chunk")]
        speculative += sum(c.tree_size > 1 for c in chunks)
        rejected += sum(c.tree_size > 1 and c.accepted == 0 for c in chunks)
    assert speculative > 0 and rejected > 0  # the draft took part, and its trees were rejected outright

