"""Every written dialect, read back, gives the same effective delta on every weight; renames are bit-exact."""
import pytest

from lorabox.conversion import convert, lora_from_state_dict
from tests.helpers import ARCHS, WRITE, assert_same_deltas, random_lora


def _through(lora, dialect, *, arch=None):
    res = convert(lora, dialect)
    return lora_from_state_dict(res.tensors, res.metadata, arch=arch), res


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", WRITE)
@pytest.mark.parametrize("dst", WRITE)
@pytest.mark.parametrize("slices", [False, True])
def test_every_dialect_to_every_dialect(arch, src, dst, slices):
    lora = random_lora(arch, every=3, slices=slices, text_encoders=(src != "bfl" and dst != "bfl"))
    a, _ = _through(lora, src)
    assert a.architecture == arch
    b, _ = _through(a, dst)
    assert b.architecture == arch
    assert_same_deltas(lora, a)
    assert_same_deltas(lora, b)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_alpha_dialects_round_trip_bit_exact(arch, dialect):
    lora = random_lora(arch, every=2)
    back, _ = _through(lora, dialect)
    assert back.adapters.keys() == lora.adapters.keys()
    for key, a in lora.adapters.items():
        b = back.adapters[key]
        assert a.tensors.keys() == b.tensors.keys()
        for role in a.tensors:
            assert a.tensors[role].bits_equal(b.tensors[role]), (key, role)
        assert a.alpha.bits_equal(b.alpha)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_then_fuse_gives_back_the_fused_tensors(arch):
    """kohya (fused qkv) -> diffusers (split) -> kohya: the original fused tensors, bit for bit."""
    lora = random_lora(arch, every=1, alpha=4.0)  # alpha == rank: diffusers needs no folding
    peft, _ = _through(lora, "diffusers")
    again, _ = _through(peft, "kohya")
    for key, a in lora.adapters.items():
        b = again.adapters[key]
        for role in a.tensors:
            assert a.tensors[role].bits_equal(b.tensors[role]), (key, role)


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_then_split_gives_back_the_slices(arch):
    """diffusers (slices) -> kohya (block-diagonal fused) -> diffusers: the original slices, bit for bit."""
    lora = random_lora(arch, every=1, slices=True, alpha=4.0)
    kohya, _ = _through(lora, "kohya")
    back, _ = _through(kohya, "diffusers")
    assert back.adapters.keys() == lora.adapters.keys()
    for key, a in lora.adapters.items():
        for role in a.tensors:
            assert a.tensors[role].bits_equal(back.adapters[key].tensors[role]), (key, role)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("via", ["diffusers", "bfl"])
@pytest.mark.parametrize("alpha,dtype", [(2.0, "BF16"), (3.0, "BF16"), (16.0, "F16"), (1.0, "F32")])
def test_round_trip_through_a_dialect_without_alpha_gives_back_the_original(arch, via, alpha, dtype):
    """kohya -> diffusers/bfl (alpha folded into the weights) -> kohya: the original tensors and alphas, bit for bit,
    from the `lorabox.folded_alpha` record; without the record the deltas are still equal."""
    lora = random_lora(arch, every=2, alpha=alpha, dtype=dtype, text_encoders=(via != "bfl"))
    kohya, _ = _through(lora, "kohya")
    folded, res = _through(kohya, via)
    assert all(a.alpha is not None for a in folded.adapters.values())  # restored on read
    back, _ = _through(folded, "kohya")
    for key, a in lora.adapters.items():
        b = back.adapters[key]
        for role in a.tensors:
            assert a.tensors[role].bits_equal(b.tensors[role]), (key, role)
        assert a.alpha.bits_equal(b.alpha), key
    stripped = {k: v for k, v in res.metadata.items() if k != "lorabox.folded_alpha"}
    assert_same_deltas(lora, lora_from_state_dict(res.tensors, stripped, arch=arch))
