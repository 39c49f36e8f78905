"""Tree attention: torch reference vs. a naive formula, Triton (interpreter) vs. reference, dispatch.

Triton runs here under TRITON_INTERPRET=1 on CPU tensors (~1000x slower than torch), so shapes are
tiny. No subprocess is needed for the env var: triton reads TRITON_INTERPRET when a function is
jitted, the kernel module jits on first use per interpreter mode, and the kernel calls no
triton.language.standard @jit helpers (which would stay compiled-only because triton is imported
below, before the variable is set). So a per-test monkeypatched env var takes effect and does not
leak into other test modules; these tests also cover that import order.
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
from specmesh.kernels.tree_attention import (
    ENV_BACKEND,
    select_backend,
    tree_attention_reference,
    tree_attention_triton,
    triton_available,
)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run Triton kernels in the CPU interpreter for this test only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_tree_mask(n: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """[n, s] mask shaped like a real round: prefix all True, a random ancestor subset, self.

    The last n slots are the new tokens themselves (when s >= n); each row sees the prefix, a random
    subset of the tree slots before its own slot (its "ancestors"), and its own slot.
    """
    n_new = n if s >= n else 0  # s < n cannot hold the new tokens: plain prefix + random rows
    prefix = max(1, (s - n_new) // 2) if s > n_new else 0
    mask = torch.zeros(n, s, dtype=torch.bool)
    mask[:, :prefix] = True
    for i in range(n):
        self_col = s - n_new + i if n_new else s
        tree_cols = torch.arange(prefix, self_col)
        picked = torch.rand(len(tree_cols), generator=gen) < 0.5
        mask[i, tree_cols[picked]] = True
        if n_new:
            mask[i, self_col] = True
    return mask


def make_inputs(
    h: int, hkv: int, n: int, s: int, d: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q contiguous; k, v as non-contiguous views of bigger caches, the way the runner passes them.

    k is a slice along S of a head-major cache [Hkv, S_total, D]; v is a slice of a token-major
    cache [S_total, Hkv, D] seen through a transpose, so both have non-trivial strides.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(h, n, d, generator=gen).to(dtype)
    k_cache = torch.randn(hkv, s + 9, d, generator=gen).to(dtype)
    v_cache = torch.randn(s + 9, hkv, d, generator=gen).to(dtype)
    k = k_cache[:, 3 : 3 + s]
    v = v_cache[5 : 5 + s].transpose(0, 1)
    mask = random_tree_mask(n, s, gen)
    return q, k, v, mask


def naive_attention(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
    """softmax(q k^T * scale, masked) v with explicit GQA expansion; fully masked rows -> 0."""
    group = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(group, dim=0).double()
    vv = v.repeat_interleave(group, dim=0).double()
    logits = q.double() @ kk.transpose(1, 2) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all -inf row -> NaN -> 0
    return (probs @ vv).to(q.dtype)


# ---------------------------------------------------------------- reference vs. naive formula


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("n,s", [(1, 7), (5, 33), (16, 33), (16, 7)])
def test_reference_matches_naive(h: int, hkv: int, n: int, s: int) -> None:
    q, k, v, mask = make_inputs(h, hkv, n, s, 8, seed=n * 100 + s)
    mask[0] = False  # one fully masked row: zeros, not NaN
    scale = 8**-0.5
    out = tree_attention_reference(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, naive_attention(q, k, v, mask, scale), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


def test_reference_mask_none_and_bf16() -> None:
    q, k, v, _ = make_inputs(4, 2, 5, 33, 16, seed=1)
    torch.testing.assert_close(
        tree_attention_reference(q, k, v, None, 0.25), naive_attention(q, k, v, None, 0.25),
        rtol=1e-5, atol=1e-5,
    )
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = tree_attention_reference(qb, kb, vb, None, 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_attention(q, k, v, None, 0.25), rtol=0, atol=3e-2)


# ---------------------------------------------------------------- Triton (interpreter) vs. reference


@needs_triton
@pytest.mark.parametrize("d", [16, 8])  # 8 exercises the D padding to 16
@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("s", [7, 33])  # 33 with block_n=16: three key tiles, the last partial
def test_triton_matches_reference_fp32(interpret: None, d: int, n: int, s: int) -> None:
    q, k, v, mask = make_inputs(4, 2, n, s, d, seed=d * 1000 + n * 100 + s)
    scale = d**-0.5
    out = tree_attention_triton(q, k, v, mask, scale, block_n=16)
    ref = tree_attention_reference(q, k, v, mask, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_fully_masked_row_is_zero(interpret: None) -> None:
    q, k, v, mask = make_inputs(4, 2, 5, 33, 16, seed=7)
    mask[2] = False
    out = tree_attention_triton(q, k, v, mask, 0.25, block_n=16)
    assert not torch.isnan(out).any()
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_mask_none_default_blocks(interpret: None) -> None:
    q, k, v, _ = make_inputs(4, 2, 5, 33, 16, seed=3)
    torch.testing.assert_close(
        tree_attention_triton(q, k, v, None, 0.25), tree_attention_reference(q, k, v, None, 0.25),
        rtol=1e-5, atol=1e-5,
    )


@needs_triton
def test_triton_many_query_blocks_strided_uint8_mask(interpret: None) -> None:
    # N=33 with block_m=16: three query blocks, the last one partial. The mask is a uint8,
    # non-contiguous slice of a bigger mask, as a preallocated tree-mask buffer would give.
    q, k, v, mask = make_inputs(4, 2, 33, 40, 16, seed=11)
    big = torch.zeros(40, 64, dtype=torch.uint8)
    big[2:35, 10:50] = mask.to(torch.uint8)
    mask_view = big[2:35, 10:50]
    assert not mask_view.is_contiguous()
    out = tree_attention_triton(q, k, v, mask_view, 0.25, block_m=16, block_n=16)
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("d,n,s", [(16, 5, 33), (8, 16, 7)])
def test_triton_bf16_loose(interpret: None, d: int, n: int, s: int) -> None:
    q, k, v, mask = make_inputs(4, 2, n, s, d, seed=d + n + s, dtype=torch.bfloat16)
    out = tree_attention_triton(q, k, v, mask, d**-0.5, block_n=16)
    assert out.dtype == torch.bfloat16
    # Both sides round to bf16 at the end; the kernel accumulates in fp32 throughout.
    ref = naive_attention(q.float(), k.float(), v.float(), mask, d**-0.5)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


@needs_triton
def test_triton_rejects_bad_inputs(interpret: None) -> None:
    q, k, v, mask = make_inputs(3, 2, 5, 7, 8, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        tree_attention_triton(q, k, v, mask, 1.0)
    q, k, v, mask = make_inputs(4, 2, 5, 7, 8, seed=0)
    with pytest.raises(ValueError, match="mask"):
        tree_attention_triton(q, k, v, mask[:, :6], 1.0)
    with pytest.raises(ValueError, match="power of two"):
        tree_attention_triton(q, k, v, mask, 1.0, block_n=8)


@needs_triton
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, mask = make_inputs(4, 2, 5, 7, 8, seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tree_attention_triton(q, k, v, mask, 1.0)


# ---------------------------------------------------------------- dispatch


def test_dispatch_picks_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    q, k, v, mask = make_inputs(4, 2, 5, 33, 16, seed=5)
    assert select_backend(q) == "reference"
    out = dispatch_tree_attention(q, k, v, mask, 0.25)
    assert torch.equal(out, tree_attention_reference(q, k, v, mask, 0.25))


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
    assert select_backend(q) == "reference"
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
    q, k, v, mask = make_inputs(4, 2, 5, 7, 16, seed=9)
    out = dispatch_tree_attention(q, k, v, mask, 0.25)
    assert calls == [1]
    torch.testing.assert_close(out, tree_attention_reference(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-5)


def test_import_and_dispatch_without_triton() -> None:
    # `import specmesh.kernels` must work where triton is not installed (it is an optional extra).
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, specmesh.kernels as K\n"
        "from specmesh.kernels.tree_attention import triton_available, select_backend\n"
        "assert not triton_available()\n"
        "q = torch.randn(4, 3, 8); k = torch.randn(2, 5, 8); v = torch.randn(2, 5, 8)\n"
        "assert select_backend(q) == 'reference'\n"
        "assert K.tree_attention(q, k, v, None, 0.3).shape == (4, 3, 8)\n"
        "try:\n"
        "    K.tree_attention_triton(q, k, v, None, 0.3)\n"
        "except RuntimeError as e:\n"
        "    assert 'not importable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = {key: val for key, val in os.environ.items() if key != ENV_BACKEND}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
