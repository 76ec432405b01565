"""Our float16 decoding (a lookup table) is bit-identical to torch's cast."""
import numpy as np
import torch

from lorabox.tensor import f16_to_f32


def test_f16_to_f32_is_exact_for_every_half():
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = f16_to_f32(every)
    theirs = torch.from_numpy(every.view(np.int16)).view(torch.float16).float().numpy()
    same = (ours.view(np.uint32) == theirs.view(np.uint32)) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all()
