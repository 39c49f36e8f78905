"""Varlen tree attention: torch reference vs. a naive formula, Triton (interpreter) vs. reference, dispatch.

Triton runs here under TRITON_INTERPRET=1 on CPU tensors (~1000x slower than torch), so shapes are
tiny. No subprocess is needed for the env var: triton reads TRITON_INTERPRET when a function is
jitted, the kernel module jits on first use per interpreter mode, and the kernel calls no
triton.language.standard @jit helpers (which would stay compiled-only because triton is imported
below, before the variable is set). So a per-test monkeypatched env var takes effect and does not
leak into other test modules; these tests also cover that import order.

A batch mixes the shapes the runner produces: a target subtree (n x n ancestry after the prefix),
a draft expansion (new leaves x (cached tree slots + leaves)), a causal prefill chunk and a
one-row decode without a mask.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import pytest
import torch

from specmesh.kernels import tree_attention as dispatch_tree_attention
from specmesh.kernels.tree_attention import cpu
from specmesh.kernels.tree_attention import (
    ENV_BACKEND,
    TreeLayout,
    select_backend,
    tree_attention_reference,
    tree_attention_triton,
    triton_available,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")

# (rows, prefix, cached tree slots before the rows, mask kind) per sequence of a batch
MIXED = [(5, 9, 0, "tree"), (4, 6, 7, "tree"), (6, 3, 0, "causal"), (1, 12, 0, None)]


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run Triton kernels in the CPU interpreter for this test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_tree_rows(n: int, cached: int, gen: torch.Generator) -> torch.Tensor:
    """[n, cached + n]: each new row sees a random subset of the cached tree slots and of the earlier
    new rows (its "ancestors"), and itself."""
    mask = torch.rand(n, cached + n, generator=gen) < 0.5
    mask[:, cached:] &= torch.ones(n, n, dtype=torch.bool).tril()
    mask[:, cached:] |= torch.eye(n, dtype=torch.bool)
    return mask


def make_batch(h: int, hkv: int, d: int, spec: list, seed: int, dtype: torch.dtype = torch.float32,
               shared: bool = True) -> tuple[torch.Tensor, list, list, TreeLayout]:
    """q packed [h, R, d]; per sequence k, v views of one pool (shared) or of separate tensors.

    Pool views are slices along S of a head-major [hkv, S_total, d] k cache and of a token-major
    [S_total, hkv, d] v cache seen through a transpose, so both have non-trivial strides.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = [p + c + n for n, p, c, _ in spec]
    total = sum(sizes) + 3 * len(spec)
    rows = sum(n for n, *_ in spec)
    q = torch.randn(h, rows, d, generator=gen).to(dtype)
    ks, vs, masks, q_start, at = [], [], [], [], 0
    k_pool = torch.randn(hkv, total, d, generator=gen).to(dtype)
    v_pool = torch.randn(total, hkv, d, generator=gen).to(dtype)
    base = 0
    for (n, p, c, kind), s in zip(spec, sizes):
        if shared:
            ks.append(k_pool[:, base + 2:base + 2 + s + 1])  # one spare slot: kv_len < view length
            vs.append(v_pool[base + 1:base + 1 + s + 1].transpose(0, 1))
            base += s + 3
        else:
            ks.append(torch.randn(hkv, s, d, generator=gen).to(dtype))
            vs.append(torch.randn(hkv, s, d, generator=gen).to(dtype))
        masks.append(None if kind is None else random_tree_rows(n, c, gen) if kind == "tree"
                     else torch.ones(n, n, dtype=torch.bool).tril())
        q_start.append(at)
        at += n
    layout = TreeLayout(q_start, [n for n, *_ in spec], sizes, [p for _, p, *_ in spec], masks)
    return q, ks, vs, layout


def naive_attention(q, k, v, layout, scale):  # type: ignore[no-untyped-def]
    """Per sequence softmax(q k^T * scale, masked) v with explicit GQA expansion; fully masked rows -> 0."""
    out = torch.empty_like(q)
    for b in range(layout.num_seqs):
        a, n, s, p = layout.q_start[b], layout.q_len[b], layout.kv_len[b], layout.prefix[b]
        group = q.shape[0] // k[b].shape[0]
        kk = k[b][:, :s].repeat_interleave(group, dim=0).double()
        vv = v[b][:, :s].repeat_interleave(group, dim=0).double()
        logits = q[:, a:a + n].double() @ kk.transpose(1, 2) * scale
        if layout.masks[b] is not None:
            full = torch.ones(n, s, dtype=torch.bool)
            full[:, p:] = layout.masks[b]
            logits = logits.masked_fill(~full, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all -inf row -> NaN -> 0
        out[:, a:a + n] = (probs @ vv).to(q.dtype)
    return out


# ---------------------------------------------------------------- the layout


def test_layout_rejects_a_mask_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[q_len, kv_len - prefix\]"):
        TreeLayout([0], [3], [10], [7], [torch.ones(3, 10, dtype=torch.bool)])  # a dense mask
    with pytest.raises(ValueError, match="prefix"):
        TreeLayout([0], [3], [10], [11], [None])
    with pytest.raises(ValueError, match="one entry per sequence"):
        TreeLayout([0, 3], [3], [10], [7], [None])


# ---------------------------------------------------------------- reference vs. naive formula


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("spec", [MIXED, MIXED[:1], MIXED[3:], [(16, 20, 0, "tree"), (16, 0, 0, "causal")]])
def test_reference_matches_naive(h: int, hkv: int, spec: list) -> None:
    q, k, v, layout = make_batch(h, hkv, 8, spec, seed=len(spec) * 10 + h + hkv)
    scale = 8**-0.5
    out = tree_attention_reference(q, k, v, layout, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, naive_attention(q, k, v, layout, scale), rtol=1e-5, atol=1e-5)


def test_reference_fully_masked_row_and_bf16() -> None:
    spec = [(5, 0, 2, "tree"), (3, 4, 0, "tree")]  # no prefix: a row can see nothing at all
    q, k, v, layout = make_batch(4, 2, 16, spec, seed=1)
    layout.masks[0][1] = False
    out = tree_attention_reference(q, k, v, layout, 0.25)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    torch.testing.assert_close(out, naive_attention(q, k, v, layout, 0.25), rtol=1e-5, atol=1e-5)
    qb, kb, vb = q.bfloat16(), [t.bfloat16() for t in k], [t.bfloat16() for t in v]
    outb = tree_attention_reference(qb, kb, vb, layout, 0.25)
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb.float(), out, rtol=0, atol=3e-2)


def test_batched_rows_equal_each_sequence_alone() -> None:
    # What the runner relies on for lossless batching: a sequence's rows do not depend on its batch.
    q, k, v, layout = make_batch(4, 2, 16, MIXED, seed=4)
    batched = tree_attention_reference(q, k, v, layout, 0.25)
    for b in range(layout.num_seqs):
        a, n = layout.q_start[b], layout.q_len[b]
        alone = tree_attention_reference(q[:, a:a + n], [k[b]], [v[b]],
                                         TreeLayout.single(n, layout.kv_len[b], layout.prefix[b], layout.masks[b]),
                                         0.25)
        assert torch.equal(batched[:, a:a + n], alone)


# ---------------------------------------------------------------- the CPU kernel (token rows)


@pytest.fixture(scope="module")
def cpu_kernel() -> None:
    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1), (6, 2)])
def test_cpu_kernel_matches_naive(cpu_kernel: None, h: int, hkv: int, d: int) -> None:
    spec = [*MIXED, (16, 20, 0, "tree"), (3, 0, 2, "tree")]
    q, k, v, layout = make_batch(h, hkv, d, spec, seed=h * 100 + hkv * 10 + d)
    layout.masks[-1][1] = False  # no prefix and an empty mask row: it sees nothing, gives zeros
    scale = d**-0.5
    out = torch.empty(q.shape[1], h, d)
    cpu.tree_attention_cpu(q, k, v, layout, scale, layout.num_seqs, out)
    out = out.transpose(0, 1)
    torch.testing.assert_close(out, naive_attention(q, k, v, layout, scale), rtol=1e-5, atol=1e-5)
    a = layout.q_start[-1]
    assert torch.equal(out[:, a + 1], torch.zeros_like(out[:, a + 1]))
    qb, kb, vb = q.bfloat16(), [t.bfloat16() for t in k], [t.bfloat16() for t in v]
    outb = torch.empty(q.shape[1], h, d, dtype=torch.bfloat16)
    cpu.tree_attention_cpu(qb, kb, vb, layout, scale, layout.num_seqs, outb)
    naive_b = naive_attention(qb.float(), [t.float() for t in kb], [t.float() for t in vb], layout, scale)
    torch.testing.assert_close(outb.transpose(0, 1).float(), naive_b, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_rows_do_not_depend_on_the_batch(cpu_kernel: None, dtype: torch.dtype) -> None:
    q, k, v, layout = make_batch(4, 2, 64, MIXED, seed=6, dtype=dtype)
    batched = torch.empty(q.shape[1], 4, 64, dtype=dtype)
    cpu.tree_attention_cpu(q, k, v, layout, 0.125, layout.num_seqs, batched)
    for b in range(layout.num_seqs):
        a, n = layout.q_start[b], layout.q_len[b]
        alone = torch.empty(n, 4, 64, dtype=dtype)
        single = TreeLayout.single(n, layout.kv_len[b], layout.prefix[b], layout.masks[b])
        cpu.tree_attention_cpu(q[:, a:a + n], [k[b]], [v[b]], single, 0.125, 1, alone)
        assert torch.equal(batched[a:a + n], alone), b
        for r in range(n):  # and a row of a tree equals that row with the others masked out of view
            if layout.masks[b] is None:
                continue
            one = torch.empty(1, 4, 64, dtype=dtype)
            row = TreeLayout.single(1, layout.kv_len[b], layout.prefix[b], layout.masks[b][r:r + 1])
            cpu.tree_attention_cpu(q[:, a + r:a + r + 1], [k[b]], [v[b]], row, 0.125, 1, one)
            assert torch.equal(batched[a + r], one[0]), (b, r)


def test_cpu_kernel_names_bad_input(cpu_kernel: None) -> None:
    q, k, v, layout = make_batch(4, 2, 64, MIXED[:2], seed=7)
    out = torch.empty(q.shape[1], 4, 64)
    with pytest.raises(RuntimeError, match="out must be"):
        cpu.tree_attention_cpu(q, k, v, layout, 0.1, 2, torch.empty(1, 4, 64))
    with pytest.raises(RuntimeError, match="like q"):
        cpu.tree_attention_cpu(q, [t.double() for t in k], v, layout, 0.1, 2, out)
    with pytest.raises(RuntimeError, match="head dim 48"):
        q48, k48, v48, l48 = make_batch(4, 2, 48, MIXED[:1], seed=8)
        cpu.tree_attention_cpu(q48, k48, v48, l48, 0.1, 1, torch.empty(q48.shape[1], 4, 48))


# ---------------------------------------------------------------- Triton (interpreter) vs. reference


@needs_triton
@pytest.mark.parametrize("d", [16, 8])  # 8 exercises the D padding to 16
@pytest.mark.parametrize("shared", [True, False])  # one launch over a pool / one launch per sequence
def test_triton_matches_reference_fp32(interpret: None, d: int, shared: bool) -> None:
    q, k, v, layout = make_batch(4, 2, d, MIXED, seed=d * 10 + shared, shared=shared)
    scale = d**-0.5
    out = tree_attention_triton(q, k, v, layout, scale, block_n=16)
    ref = tree_attention_reference(q, k, v, layout, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_many_blocks_and_fully_masked_row(interpret: None) -> None:
    # 33 rows with block_m=16: three row blocks for one sequence, one for the short ones; 40+ slots
    # with block_n=16: several key tiles, the last partial, one of them straddling the prefix end.
    spec = [(33, 9, 0, "tree"), (2, 20, 5, "tree"), (1, 0, 0, None)]
    q, k, v, layout = make_batch(4, 2, 16, spec, seed=11)
    layout.masks[1][0] = False
    out = tree_attention_triton(q, k, v, layout, 0.25, block_m=16, block_n=16)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, layout, 0.25), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_default_blocks_and_bf16(interpret: None) -> None:
    q, k, v, layout = make_batch(4, 2, 16, MIXED, seed=3, dtype=torch.bfloat16)
    out = tree_attention_triton(q, k, v, layout, 0.25)
    assert out.dtype == torch.bfloat16
    # Both sides round to bf16 at the end; the kernel accumulates in fp32 throughout.
    ref = naive_attention(q.float(), [t.float() for t in k], [t.float() for t in v], layout, 0.25)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


@needs_triton
def test_triton_rejects_bad_inputs(interpret: None) -> None:
    q, k, v, layout = make_batch(3, 2, 8, MIXED[:2], seed=0)
    with pytest.raises(ValueError, match="multiple"):
        tree_attention_triton(q, k, v, layout, 1.0)
    q, k, v, layout = make_batch(4, 2, 8, MIXED[:2], seed=0)
    with pytest.raises(ValueError, match="one k and one v"):
        tree_attention_triton(q, k[:1], v[:1], layout, 1.0)
    with pytest.raises(ValueError, match="rows"):
        tree_attention_triton(q[:, :3], k, v, layout, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        tree_attention_triton(q, k, v, layout, 1.0, block_n=8)


@needs_triton
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, layout = make_batch(4, 2, 8, MIXED[:2], seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tree_attention_triton(q, k, v, layout, 1.0)


# ---------------------------------------------------------------- dispatch


def test_dispatch_on_cpu_takes_the_kernel_for_token_sequences_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    q, k, v, layout = make_batch(4, 2, 16, MIXED, seed=5)
    assert select_backend(q) == ("cpu" if cpu.available() else "reference")
    assert select_backend(q[..., :8]) == "reference"  # a head dim the kernel does not have
    ref = tree_attention_reference(q, k, v, layout, 0.25)
    assert torch.equal(dispatch_tree_attention(q, k, v, layout, 0.25), ref)  # no token sequences
    if not cpu.available():
        return
    split = dispatch_tree_attention(q, k, v, layout, 0.25, token_seqs=2)
    a = layout.q_start[2]
    assert torch.equal(split[:, a:], ref[:, a:])  # prompt sequences: the reference, bit for bit
    kernel = torch.empty(q.shape[1], 4, 16)
    cpu.tree_attention_cpu(q, k, v, layout, 0.25, 2, kernel)
    assert torch.equal(split[:, :a], kernel.transpose(0, 1)[:, :a])
    monkeypatch.setenv(ENV_BACKEND, "reference")
    assert torch.equal(dispatch_tree_attention(q, k, v, layout, 0.25, token_seqs=2), ref)


def test_dispatch_picks_triton_for_cuda_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    fake_cuda = types.SimpleNamespace(is_cuda=True)  # no GPU here: only the decision is checked
    expected = "triton" if triton_available() else "reference"
    assert select_backend(fake_cuda) == expected  # type: ignore[arg-type]


def test_dispatch_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.zeros(1, 1, 16)
    monkeypatch.setenv(ENV_BACKEND, "reference")
    assert select_backend(types.SimpleNamespace(is_cuda=True)) == "reference"  # type: ignore[arg-type]
    monkeypatch.setenv(ENV_BACKEND, "Triton")
    assert select_backend(q) == "triton"
    monkeypatch.setenv(ENV_BACKEND, "auto")
    assert select_backend(q) == ("cpu" if cpu.available() else "reference")
    monkeypatch.setenv(ENV_BACKEND, "cudnn")
    with pytest.raises(ValueError, match=ENV_BACKEND):
        select_backend(q)


@needs_triton
def test_dispatch_env_forces_triton_on_cpu(interpret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    # importlib, not `import ... as`: the package attribute specmesh.kernels.tree_attention is the
    # dispatch function (re-exported by kernels/__init__), which shadows the subpackage name.
    ta = importlib.import_module("specmesh.kernels.tree_attention")

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return tree_attention_triton(*args, **kwargs)

    monkeypatch.setattr(ta, "tree_attention_triton", spy)
    monkeypatch.setenv(ENV_BACKEND, "triton")
    q, k, v, layout = make_batch(4, 2, 16, MIXED[:2], seed=9)
    out = dispatch_tree_attention(q, k, v, layout, 0.25)
    assert calls == [1]
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, layout, 0.25), rtol=1e-5, atol=1e-5)


def test_import_and_dispatch_without_triton() -> None:
    # `import specmesh.kernels` must work where triton is not installed (it is an optional extra).
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, specmesh.kernels as K\n"
        "from specmesh.kernels.tree_attention import triton_available, select_backend\n"
        "assert not triton_available()\n"
        "q = torch.randn(4, 3, 8); k = [torch.randn(2, 5, 8)]; v = [torch.randn(2, 5, 8)]\n"
        "L = K.TreeLayout.single(3, 5, 2, None)\n"
        "assert select_backend(q) == 'reference'\n"
        "assert K.tree_attention(q, k, v, L, 0.3).shape == (4, 3, 8)\n"
        "try:\n"
        "    K.tree_attention_triton(q, k, v, L, 0.3)\n"
        "except RuntimeError as e:\n"
        "    assert 'not importable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = {key: val for key, val in os.environ.items() if key != ENV_BACKEND}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
