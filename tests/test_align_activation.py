"""Tests of activation matching (neuron alignment; Li et al. 2016, Tatro et al. 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modeconn._src.align import StreamingCorrelation


# --- streaming statistics -------------------------------------------------------------------------
def test_streaming_correlation_equals_corrcoef_on_one_big_batch():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = 3.0 + torch.randn(1000, 6, generator=g, dtype=torch.float64) * 2  # offset and scale
    b = a @ mix + 0.5 * torch.randn(1000, 5, generator=g, dtype=torch.float64) - 7.0
    s = StreamingCorrelation(6, 5)
    for lo in range(0, 1000, 128):  # uneven batches, the last one short
        s.update(a[lo : lo + 128].float(), b[lo : lo + 128].float())
    oracle = np.corrcoef(a.float().double().numpy().T, b.float().double().numpy().T)[:6, 6:]
    np.testing.assert_allclose(s.correlation(eps=0).numpy(), oracle, atol=1e-9)
    # with the seed code's guard: Z_A Z_B^T / n, z = (x - mean) / (np.std(x) + eps)
    an, bn = a.float().double().numpy(), b.float().double().numpy()
    za = (an - an.mean(0)) / (an.std(0) + 1e-5)
    zb = (bn - bn.mean(0)) / (bn.std(0) + 1e-5)
    np.testing.assert_allclose(s.correlation().numpy(), za.T @ zb / len(an), atol=1e-9)


def test_streaming_correlation_of_a_constant_unit_is_zero_not_nan():
    s = StreamingCorrelation(2, 2)
    x = torch.randn(50, 2)
    x[:, 1] = 4.0  # a dead unit
    s.update(x, x)
    c = s.correlation()
    assert torch.isfinite(c).all()
    assert c[1].abs().max() < 1e-6
    assert c[0, 0] == pytest.approx(1.0, abs=1e-4)
