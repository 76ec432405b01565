"""numpy's PCG64 stream made by torch (`lorabox.quant.pcg64_torch`), the draws of the device's stochastic fp8
rounding, against numpy's own generator (`fp8.stochastic_draws`). On torch's CPU device here, and on the GPU too
with `LORABOX_TEST_CUDA=1`."""
import numpy as np
import pytest
import torch

from lorabox.quant import fp8, pcg64_torch
from tests.test_merge_devices import DEVICES


def _want(seed: int, first: int, n: int) -> np.ndarray:
    return fp8.stochastic_draws(first + n, seed)[first:].astype(np.int64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, first, n", [
    (0, 0, 0), (0, 0, 1), (1, 0, 2), (12345, 0, 1001), (7, 2, 5),
    (fp8.seed_for_key("double_blocks.0.img_attn.qkv.weight"), 0, 777),
    (2**32 - 1, 0, 2 * 65536 + 3),  # past the first block, odd
    (99, 131070, 300_000),  # from the stream's output 65,535 on: the host's jump to the first state
])
def test_draws_are_numpys_pcg64_stream(device, seed, first, n):
    got = pcg64_torch.draws(torch, seed, first, n, device)
    assert got.dtype == torch.int64 and got.device.type == device
    np.testing.assert_array_equal(got.cpu().numpy(), _want(seed, first, n))


@pytest.mark.parametrize("device", DEVICES)
def test_many_small_blocks_each_start_where_the_stream_is(device, monkeypatch):
    """Blocks of 16 outputs: 200 block starts, each stepped from the one before on the host."""
    monkeypatch.setattr(pcg64_torch, "BLOCK", 16)
    for seed, first in ((3, 0), (4, 10), (5, 6400)):
        got = pcg64_torch.draws(torch, seed, first, 6399, device)
        np.testing.assert_array_equal(got.cpu().numpy(), _want(seed, first, 6399))


def test_jump_is_that_many_steps():
    state, inc = pcg64_torch.stream(42)
    s = state
    for k in range(1, 40):
        s = (pcg64_torch.MULT * s + inc) & pcg64_torch.MASK
        a, c = pcg64_torch.jump(k, inc)
        assert (a * state + c) & pcg64_torch.MASK == s


def test_draws_start_at_an_even_element():
    with pytest.raises(ValueError, match="even"):
        pcg64_torch.draws(torch, 1, 3, 10, "cpu")
