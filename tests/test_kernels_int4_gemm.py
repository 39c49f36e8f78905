"""int4 GEMM: packed layout round trip, the AVX-512 kernel against the torch reference, row
independence (bit-identical rows whatever M and the other rows are), dispatch and bad input.

The kernel compiles on first use (about a minute on 2 cores, then cached in torch's extension
dir); tests that need it skip with the reason where it cannot build (no AVX-512 BF16, no compiler).

Tolerances against the fp32 reference (which dequantizes and runs one fp32 BLAS matmul):
- fp32 activations: |y - ref| <= 2e-5 * max|ref| (the kernel splits x into two bf16 halves, about
  16 mantissa bits, and sums in its own fixed order);
- bf16 activations: within 2^-7 relative plus 1e-4 * max|ref| (both round an fp32 sum to bf16:
  sums that differ in the last fp32 bits may round one bf16 ulp apart);
- Q8 activations (int8 codes per row and 32 columns): the reference quantizes the same way, so
  against it fp32 outputs agree to 1e-6 * max|ref| (one code off would cost about 1e-3).
"""
from __future__ import annotations

import pytest
import torch

from specmesh.kernels import int4_gemm as k4
from specmesh.kernels.int4_gemm import cpu, layout
from specmesh.services.runtime.quant import Int4Groups, int4_groups_from_dense

from kernel_testing import SHAPES, assert_matches_reference, assert_near_exact

pytestmark = pytest.mark.timeout(900)  # the first test that needs the kernel also compiles it




def random_groups(n: int, k: int, seed: int) -> Int4Groups:
    gen = torch.Generator().manual_seed(seed)
    return int4_groups_from_dense(torch.randn(n, k, generator=gen) * 0.05)


def random_x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_round_trip_is_exact(n: int, k: int) -> None:
    groups = random_groups(n, k, seed=n + k)
    exact = layout.pack(groups, torch.float32)
    assert exact.data.shape == (-(-n // 16), k // 32, 128 + 256)
    assert exact.data.data_ptr() % 64 == 0
    assert torch.equal(layout.unpack_q(exact), groups.q)
    assert torch.equal(layout.dequantize(exact), groups.dequantize())
    rounded = layout.pack(groups, torch.bfloat16)
    assert rounded.nbytes() == -(-n // 16) * 16 * k // 32 * 20  # 4.5 bits per weight
    scale, zero = layout.scales_zeros(rounded)
    assert torch.equal(scale, groups.scale.to(torch.bfloat16).float())
    assert torch.equal(zero, groups.zero.to(torch.bfloat16).float())


def test_pack_refuses_what_it_cannot_hold() -> None:
    groups = random_groups(16, 64, seed=0)
    with pytest.raises(ValueError, match="groups of 32"):
        layout.pack(Int4Groups(groups.q[:, :48], groups.scale[:, :1], groups.zero[:, :1]))
    with pytest.raises(ValueError, match="above 15"):
        layout.pack(Int4Groups(groups.q + 16, groups.scale, groups.zero))
    with pytest.raises(ValueError, match="scale_dtype"):
        layout.pack(groups, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_kernel_matches_reference(quant_kernel: None, n: int, k: int, scale_dtype: torch.dtype,
                                  dtype: torch.dtype) -> None:
    packed = layout.pack(random_groups(n, k, seed=1), scale_dtype)
    for m, with_bias in [(1, False), (3, True), (8, False), (9, True), (17, True), (32, False)]:
        x = random_x(m, k, dtype, seed=m)
        bias = torch.randn(n).to(dtype) if with_bias else None
        assert_matches_reference(cpu.int4_gemm_cpu(x, packed, bias), k4.int4_gemm_reference(x, packed, bias), 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_q8_activations_match_reference(quant_kernel: None, n: int, k: int, scale_dtype: torch.dtype,
                                        dtype: torch.dtype) -> None:
    packed = layout.pack(random_groups(n, k, seed=6), scale_dtype)
    for m, with_bias in [(1, False), (3, True), (8, False), (9, True), (17, True)]:
        x = random_x(m, k, dtype, seed=m)
        x[0, :32] = 0.0  # an all-zero group: scale 0, codes 0
        bias = torch.randn(n).to(dtype) if with_bias else None
        y = k4.int4_gemm(x, packed, bias, int8_activations=True)
        assert_matches_reference(y, k4.int4_gemm_reference(x, packed, bias, int8_activations=True), 1e-6)
        assert_near_exact(y, k4.int4_gemm_reference(x.float(), packed, None if bias is None else bias.float()))


def test_q8_codes_round_half_to_even_and_saturate() -> None:
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 127.0, 0.5, 1.5, -127.0
    codes, scale = k4.quantize_activations_q8(x)
    assert codes[0, :4].tolist() == [127, 0, 2, -127] and scale.tolist() == [[1.0]]


@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_rows_are_bit_identical_whatever_the_batch(quant_kernel: None, n: int, k: int, dtype: torch.dtype,
                                                   int8_activations: bool) -> None:
    packed = layout.pack(random_groups(n, k, seed=2))
    bias = torch.randn(n).to(dtype)
    for m in range(1, 18):
        x = random_x(m, k, dtype, seed=100 + m)
        y = k4.int4_gemm(x, packed, bias, int8_activations)
        other = random_x(m, k, dtype, seed=200 + m)  # different neighbours for every row
        for i in range(m):
            alone = k4.int4_gemm(x[i:i + 1], packed, bias, int8_activations)
            assert torch.equal(y[i:i + 1], alone), f"row {i} of {m} differs from its one-row call"
            mixed = other.clone()
            mixed[i] = x[i]
            assert torch.equal(k4.int4_gemm(mixed, packed, bias, int8_activations)[i], y[i]), \
                f"row {i} of {m} depends on others"


def test_rows_do_not_depend_on_thread_count(quant_kernel: None) -> None:
    packed = layout.pack(random_groups(256, 512, seed=3))
    x = random_x(5, 512, torch.bfloat16, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = k4.int4_gemm(x, packed)
        torch.set_num_threads(2)
        two = k4.int4_gemm(x, packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_dispatch_shapes_backends_and_bad_input(quant_kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    packed = layout.pack(random_groups(40, 96, seed=4), torch.float32)
    x = random_x(6, 96, torch.float32, seed=4).view(2, 3, 96)
    assert k4.select_backend() == "cpu"
    y = k4.int4_gemm(x, packed)
    assert y.shape == (2, 3, 40)
    assert k4.int4_gemm(x[:, :0], packed).shape == (2, 0, 40)
    strided = torch.randn(96, 6).t()  # not contiguous
    torch.testing.assert_close(k4.int4_gemm(strided, packed), k4.int4_gemm_reference(strided, packed),
                               rtol=0, atol=1e-4)
    monkeypatch.setenv(k4.ENV_BACKEND, "reference")
    assert k4.select_backend() == "reference"
    torch.testing.assert_close(k4.int4_gemm(x, packed), y, rtol=0, atol=1e-4)
    monkeypatch.setenv(k4.ENV_BACKEND, "fastest")
    with pytest.raises(ValueError, match="SPECMESH_INT4_GEMM"):
        k4.int4_gemm(x, packed)
    monkeypatch.delenv(k4.ENV_BACKEND)
    with pytest.raises(ValueError, match="96 input columns"):
        k4.int4_gemm(torch.randn(2, 64), packed)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        k4.int4_gemm(torch.randn(2, 96).half(), packed)
    with pytest.raises(ValueError, match="bias"):
        k4.int4_gemm(torch.randn(2, 96), packed, torch.randn(41))


def test_unavailable_kernel_says_why_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu.EXTENSION, "flags", lambda: {"avx2"})
    cpu.EXTENSION.reset()
    try:
        assert not cpu.available()
        why = cpu.unavailable_reason()
        assert "avx512" in why and "\n" not in why
        assert k4.select_backend() == "reference"
        with pytest.raises(RuntimeError, match="avx512"):
            cpu.int4_gemm_cpu(torch.randn(1, 64), layout.pack(random_groups(16, 64, seed=5)))
    finally:
        monkeypatch.undo()
        cpu.EXTENSION.reset()  # the next caller loads the built library again
