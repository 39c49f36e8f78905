"""int8-weight GEMM with Q8 activations: packed layout round trip, the VNNI kernel against its
torch reference, row independence (bit-identical rows whatever M and the other rows are) and bad
input. The kernel shares the int4 kernel's extension (compiled on first use)."""
from __future__ import annotations

import pytest
import torch

from specmesh.kernels import int8_gemm as k8

from kernel_testing import SHAPES, assert_matches_reference, assert_near_exact

pytestmark = pytest.mark.timeout(900)  # the first test that needs the kernel also compiles it




def random_int8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def random_x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_round_trip_is_exact(n: int, k: int) -> None:
    q, scale = random_int8(n, k, seed=n)
    q[0, :4] = torch.tensor([-128, -127, 0, 127], dtype=torch.int8)  # the extremes survive the +128
    packed = k8.pack(q, scale)
    assert packed.data.shape == (-(-n // 16), k // 32, 512) and packed.data.data_ptr() % 64 == 0
    assert torch.equal(k8.unpack_q(packed), q)
    assert torch.equal(k8.dequantize(packed), q.float() * scale[:, None])
    with pytest.raises(ValueError, match="multiple of 32"):
        k8.pack(q[:, :48], scale)
    with pytest.raises(ValueError, match="int8"):
        k8.pack(q.to(torch.int16), scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_kernel_matches_reference(quant_kernel: None, n: int, k: int, dtype: torch.dtype) -> None:
    q, scale = random_int8(n, k, seed=1)
    q[:, :32] = -127  # codes far from the +128 offset
    packed = k8.pack(q, scale)
    for m, with_bias in [(1, False), (3, True), (8, False), (9, True), (17, True)]:
        x = random_x(m, k, dtype, seed=m)
        bias = torch.randn(n).to(dtype) if with_bias else None
        y = k8.int8_gemm_cpu(x, packed, bias)
        assert_matches_reference(y, k8.int8_gemm_reference(x, packed, bias), 1e-6)
        assert_near_exact(y, x.float() @ k8.dequantize(packed).t() + (0 if bias is None else bias.float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_bit_identical_whatever_the_batch(quant_kernel: None, dtype: torch.dtype) -> None:
    packed = k8.pack(*random_int8(40, 96, seed=2))
    bias = torch.randn(40).to(dtype)
    for m in range(1, 18):
        x = random_x(m, 96, dtype, seed=100 + m)
        y = k8.int8_gemm_cpu(x, packed, bias)
        other = random_x(m, 96, dtype, seed=200 + m)
        for i in range(m):
            assert torch.equal(y[i:i + 1], k8.int8_gemm_cpu(x[i:i + 1].contiguous(), packed, bias)), (i, m)
            mixed = other.clone()
            mixed[i] = x[i]
            assert torch.equal(k8.int8_gemm_cpu(mixed, packed, bias)[i], y[i]), (i, m)


def test_bad_input_names_the_problem(quant_kernel: None) -> None:
    packed = k8.pack(*random_int8(40, 96, seed=3))
    with pytest.raises(RuntimeError, match="96"):
        k8.int8_gemm_cpu(torch.randn(2, 64), packed)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        k8.int8_gemm_cpu(torch.randn(2, 96).half(), packed)
    with pytest.raises(RuntimeError, match="bias"):
        k8.int8_gemm_cpu(torch.randn(2, 96), packed, torch.randn(41))
    assert k8.int8_gemm_cpu(torch.randn(0, 96), packed).shape == (0, 40)
