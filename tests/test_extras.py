"""Conv and Tucker LoRA, DoRA magnitudes, LoHa/LoKr, diff/diff_b: carried exactly, or refused clearly."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabox.conversion import convert, lora_from_state_dict
from lorabox.errors import UnsupportedConversion
from lorabox.lora import Adapter, Lora
from lorabox.tensor import Tensor
from tests.helpers import WRITE, assert_same_deltas, rand, random_lora


def _through(lora, dialect):
    res = convert(lora, dialect)
    return lora_from_state_dict(res.tensors, res.metadata, arch=lora.architecture), res


def _one(arch, module, tensors, alpha=2.0, component="unet", part=None):
    lora = Lora(arch)
    lora.add(Adapter(component, module, part, tensors, None if alpha is None else Tensor.scalar(alpha)))
    return lora


@pytest.mark.parametrize("dialect", WRITE)
def test_conv_3x3_and_tucker(dialect):
    rng = np.random.default_rng(0)
    lora = _one("sdxl", "input_blocks.1.0.in_layers.2", {"down": rand(rng, (4, 8, 3, 3)), "up": rand(rng, (8, 4, 1, 1))})
    lora.add(Adapter("unet", "input_blocks.0.0", None,
                     {"down": rand(rng, (4, 8, 1, 1)), "mid": rand(rng, (4, 4, 3, 3)), "up": rand(rng, (8, 4, 1, 1))},
                     Tensor.scalar(1.0)))
    if dialect in ("diffusers", "bfl"):
        with pytest.raises(UnsupportedConversion, match="cannot store mid"):
            convert(lora, dialect)
        lora.adapters.pop(("unet", "input_blocks.0.0", None))
    back, _ = _through(lora, dialect)
    assert_same_deltas(lora, back)
    assert back.adapters[("unet", "input_blocks.1.0.in_layers.2", None)].delta().shape == (8, 8, 3, 3)


@pytest.mark.parametrize("dialect", WRITE)
def test_dora_magnitude_and_bias_delta(dialect):
    rng = np.random.default_rng(1)
    t = {"down": rand(rng, (4, 16)), "up": rand(rng, (18, 4)), "dora_scale": rand(rng, (18, 1)), "diff_b": rand(rng, (18,))}
    lora = _one("flux1", "double_blocks.0.img_attn.qkv", t, alpha=4.0)
    back, res = _through(lora, dialect)
    got = back.adapters[("unet", "double_blocks.0.img_attn.qkv", None)] if dialect != "diffusers" else None
    if dialect == "diffusers":
        assert any(k.endswith("attn.to_k.lora_magnitude_vector") for k in res.tensors)
        assert any(k.endswith("attn.to_k.lora_B.bias") for k in res.tensors)
        got = _through(back, "kohya")[0].adapters[("unet", "double_blocks.0.img_attn.qkv", None)]
    ds = got.tensors.get("dora_scale", got.tensors.get("magnitude"))
    assert np.array_equal(ds.values().reshape(-1), t["dora_scale"].values().reshape(-1))
    assert np.array_equal(got.tensors["diff_b"].values(), t["diff_b"].values())
    assert_same_deltas(lora, back)


def test_swap_halves_moves_bias_and_magnitude_with_the_rows():
    rng = np.random.default_rng(2)
    t = {"down": rand(rng, (2, 8)), "up": rand(rng, (6, 2)), "diff_b": rand(rng, (6,))}
    lora = _one("flux1", "final_layer.adaLN_modulation.1", t, alpha=None)
    res = convert(lora, "diffusers")
    b = res.tensors["transformer.norm_out.linear.lora_B.bias"].values()
    assert np.array_equal(b, np.concatenate([t["diff_b"].values()[3:], t["diff_b"].values()[:3]]))
    up = res.tensors["transformer.norm_out.linear.lora_B.weight"].values()
    assert np.array_equal(up, np.concatenate([t["up"].values()[3:], t["up"].values()[:3]]))


@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_loha_lokr_kept_as_they_are(dialect):
    rng = np.random.default_rng(3)
    lora = _one("sdxl", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                {f"hada_{w}": rand(rng, s) for w, s in [("w1_a", (8, 2)), ("w1_b", (2, 8)), ("w2_a", (8, 2)), ("w2_b", (2, 8))]})
    lora.add(Adapter("unet", "input_blocks.4.1.transformer_blocks.0.attn1.to_k", None,
                     {"lokr_w1": rand(rng, (2, 2)), "lokr_w2_a": rand(rng, (4, 2)), "lokr_w2_b": rand(rng, (2, 4))},
                     Tensor.scalar(1.0)))
    back, _ = _through(lora, dialect)
    for key, a in lora.adapters.items():
        for role, tensor in a.tensors.items():
            assert tensor.bits_equal(back.adapters[key].tensors[role])
    assert_same_deltas(lora, back)
    with pytest.raises(UnsupportedConversion, match="diffusers dialect cannot store (hada|lokr)_w1"):
        convert(lora, "diffusers")


def test_lokr_on_fused_qkv_cannot_be_split_for_diffusers():
    rng = np.random.default_rng(4)
    lora = _one("flux1", "double_blocks.0.img_attn.qkv", {"lokr_w1": rand(rng, (3, 2)), "lokr_w2": rand(rng, (6, 8))})
    with pytest.raises(UnsupportedConversion, match="cannot be split"):
        convert(lora, "diffusers")
    back, _ = _through(lora, "comfyui")
    assert_same_deltas(lora, back)


def test_unequal_slice_scales_fuse_exactly():
    """q, k, v with different ranks and alphas (and v missing): fused for kohya within 1e-6."""
    rng = np.random.default_rng(5)
    lora = Lora("flux1")
    for part, (rank, alpha) in enumerate([(4, 1.0), (8, 3.0)]):
        lora.add(Adapter("unet", "single_blocks.0.linear1", part,
                         {"down": rand(rng, (rank, 16), "BF16"), "up": rand(rng, (6, rank), "BF16")}, Tensor.scalar(alpha)))
    lora.add(Adapter("unet", "single_blocks.0.linear1", 3, {"down": rand(rng, (2, 16), "BF16"),
                                                           "up": rand(rng, (24, 2), "BF16")}, None))
    back, res = _through(lora, "kohya")
    fused = back.adapters[("unet", "single_blocks.0.linear1", None)]
    assert fused.tensors["up"].shape == (42, 14)
    assert_same_deltas(lora, back)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(["sd15", "sdxl", "flux1"]), src=st.sampled_from(WRITE), dst=st.sampled_from(WRITE),
       rank=st.integers(1, 8), dtype=st.sampled_from(["BF16", "F16", "F32"]),
       alpha=st.sampled_from([1.0, 0.5, 3.0, 7.0, 16.0]), every=st.integers(1, 40), seed=st.integers(0, 2**16),
       slices=st.booleans())
def test_any_conversion_keeps_every_delta(arch, src, dst, rank, dtype, alpha, every, seed, slices):
    te = "bfl" not in (src, dst)
    lora = random_lora(arch, seed=seed, rank=rank, dtype=dtype, every=every, alpha=alpha, slices=slices, text_encoders=te)
    a, _ = _through(lora, src)
    b, _ = _through(a, dst)
    assert_same_deltas(lora, b)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("factor", [0.5, 0.125, 2.0, 1024.0, 0.75, 3.0])
def test_scale_tensor_is_exact_or_widens(dtype, factor):
    from lorabox.ops import scale_tensor

    rng = np.random.default_rng(7)
    t = Tensor.from_values(rng.standard_normal(4096) * 0.05, dtype)
    t.array[:2] = 0
    t.array[2] = -0.0 if dtype != "BF16" else 0x8000
    out = scale_tensor(t, factor)
    exact = t.values() * factor
    power_of_two = np.frexp(factor)[0] == 0.5
    if out.dtype == dtype and (power_of_two or dtype != "F32"):
        assert np.array_equal(out.values(), exact)
    else:
        assert out.dtype == "F32"
        assert np.abs(out.values() - exact).max() <= 2**-23 * np.abs(exact).max()
    if dtype == "BF16" and factor in (0.5, 0.125, 2.0, 1024.0):
        assert out.dtype == "BF16"  # powers of two stay in bf16
