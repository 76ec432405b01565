"""Our float16 conversions (a lookup table, integer arithmetic) are bit-identical to torch's casts."""
import numpy as np
import torch

from lorabox.tensor import f16_to_f32, f32_to_f16


def test_f32_to_f16_equals_torch_on_random_bits_and_edges():
    bits = np.random.default_rng(0).integers(0, 2**32, size=1_000_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x477FE000, 0x477FF000, 0x477FEFFF,
                      0x38800000, 0x387FFFFF, 0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x3F800000],
                     dtype=np.uint32)
    x = np.concatenate([bits, edges, edges | 0x80000000]).view(np.float32)
    ours = f32_to_f16(x).view(np.uint16)
    theirs = torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(ours[nan].view(np.float16)).all()
    assert np.array_equal(ours[nan] & 0x8000, theirs[nan] & 0x8000)


def test_f16_to_f32_is_exact_for_every_half():
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = f16_to_f32(every)
    theirs = torch.from_numpy(every.view(np.int16)).view(torch.float16).float().numpy()
    same = (ours.view(np.uint32) == theirs.view(np.uint32)) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all()
