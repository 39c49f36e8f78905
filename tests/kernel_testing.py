"""What the matmul kernel tests share: the stated tolerance of a kernel against its reference."""
from __future__ import annotations

import torch

# Real shapes of the 1.5B target scaled down, plus an N that is not a multiple of the 16-row tile.
SHAPES = [(256, 512), (40, 96), (16, 896)]


def assert_matches_reference(y: torch.Tensor, ref: torch.Tensor, fp32_atol: float) -> None:
    """fp32: within `fp32_atol` * max|ref|; bf16: 2^-7 relative plus 1e-4 * max|ref| (both round
    an fp32 sum to bf16, and sums that differ in the last fp32 bits may round one ulp apart)."""
    assert y.dtype == ref.dtype and y.shape == ref.shape
    top = ref.float().abs().max().item()
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=0, atol=fp32_atol * top)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=2**-7, atol=1e-4 * top)


def assert_near_exact(y: torch.Tensor, exact: torch.Tensor) -> None:
    """Q8 activations: about 8 bits per group, so within 3% of max|exact| (not garbage)."""
    assert (y.float() - exact).abs().max() < 0.03 * exact.abs().max()
