"""Self-check of the diffusers oracle and of the fixtures: every fixture loads through diffusers with no key left
unused, and diffusers' fused weights move exactly the modules the fixture targets by exactly
``alpha / rank * up @ down`` (rows placed as diffusers' single-file converters place original BFL / SGM rows)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.oracles import diffusers_oracle as oracle
from tests.oracles import tiny_models

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KOHYA_PREFIX = {"lora_unet_": None, "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


def _read(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _product(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    return (up.flatten(1).float() @ down.flatten(1).float()).reshape(shape[0], *down.shape[1:])


def _assert_deltas(base: dict, fused: dict, expected: dict[str, torch.Tensor]):
    """Weights in `expected` moved by exactly that delta; every other weight is bit-identical to the base."""
    assert set(fused) == set(base)
    for key in fused:
        if key in expected:
            delta = fused[key] - base[key]
            assert expected[key].abs().max() > 0, key
            torch.testing.assert_close(delta, expected[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(fused[key], base[key]), f"{key} changed but no LoRA module targets it"


def _zeros(base: dict):
    cache: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        if key not in cache:
            cache[key] = torch.zeros_like(base[key])
        return cache[key]

    return cache, get


def _flat_names(arch: str) -> dict[str, tuple[str, str]]:
    """kohya flat name -> (component, module) for every module of the tiny pipeline, text encoders also under the
    transformers-4 spelling with a ``text_model.`` level."""
    pipe = tiny_models.pipeline(arch)
    out = {}
    for prefix, component in KOHYA_PREFIX.items():
        component = component or oracle.DENOISER[arch]
        if component not in oracle.LORA_COMPONENTS[arch]:
            continue
        for name, _ in getattr(pipe, component).named_modules():
            out[prefix + name.replace(".", "_")] = (component, name)
            if not name.startswith("text_model.") and component.startswith("text_encoder"):
                out[prefix + "text_model_" + name.replace(".", "_")] = (component, name)
    return out


def _kohya_modules(tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
            alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else down.shape[0]
            out[name] = (up, down, alpha / down.shape[0])
    assert len(tensors) == 3 * len(out), "every kohya module has down, up and alpha"
    return out


@pytest.mark.parametrize("arch", oracle.ARCHS)
def test_peft_fixture(arch):
    tensors, header = _read(f"{arch}_peft")
    assert "lora_adapter_metadata" in header
    fused = oracle.fused_weights(arch, FIXTURES / f"{arch}_peft.safetensors")
    metadata = json.loads(header["lora_adapter_metadata"])
    base = oracle.base_weights(arch)
    expected, get = _zeros(base)
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            component = module.split(".")[0]
            scale = metadata[f"{component}.lora_alpha"] / metadata[f"{component}.r"]
            assert scale == 2.0
            down, up = tensors[key], tensors[f"{module}.lora_B.weight"]
            target = get(f"{module}.weight")
            target += scale * _product(up, down, target.shape)
    _assert_deltas(base, fused, expected)


def test_peft_dict_without_header_uses_alpha_equal_rank():
    tensors, header = _read("flux1_peft")
    with_header = oracle.lora_deltas("flux1", tensors, metadata=header)
    without = oracle.lora_deltas("flux1", tensors)
    assert set(with_header) == set(without)
    for key in without:
        torch.testing.assert_close(with_header[key], 2 * without[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_diffusers_names_fixture(arch):
    tensors, _ = _read(f"{arch}_kohya_diffusers_names")
    names = _flat_names(arch)
    base = oracle.base_weights(arch)
    expected, get = _zeros(base)
    for name, (up, down, scale) in _kohya_modules(tensors).items():
        assert scale == 1.0, "convert_state_dict_to_kohya writes alpha = rank"
        component, module = names[name]
        target = get(f"{component}.{module}.weight")
        target += scale * _product(up, down, target.shape)
    _assert_deltas(base, oracle.fused_weights(arch, tensors), expected)


def test_sdxl_kohya_sgm_fixture():
    tensors, _ = _read("sdxl_kohya_sgm")
    layout = {"lora_unet_" + k.replace(".", "_"): v for k, v in oracle.sdxl_sgm_layout(tiny_models.tiny_sdxl_unet()).items()}
    names = _flat_names("sdxl")
    base = oracle.base_weights("sdxl")
    expected, get = _zeros(base)
    for name, (up, down, scale) in _kohya_modules(tensors).items():
        assert scale == 0.5
        if name in layout:
            (piece,) = layout[name]
            target = get(f"unet.{piece.target}.weight")
        else:
            component, module = names[name]
            assert component.startswith("text_encoder"), name
            target = get(f"{component}.{module}.weight")
        target += scale * _product(up, down, target.shape)
    assert any("time_embed" in k for k in tensors) and any("_op." in k for k in tensors)
    _assert_deltas(base, oracle.fused_weights("sdxl", tensors), expected)


def _expected_from_bfl(base, tensors, layout, names):
    expected, get = _zeros(base)
    for name, (up, down, scale) in _kohya_modules(tensors).items():
        bfl = layout.get(name)
        if bfl is None:
            component, module = names[name]
            target = get(f"{component}.{module}.weight")
            target += scale * _product(up, down, target.shape)
            continue
        full = scale * (up.flatten(1).float() @ down.flatten(1).float())
        for piece in bfl:
            target = get(f"transformer.{piece.target}.weight")
            target[slice(*piece.target_rows)] += full[slice(*piece.source_rows)]
    return expected


def test_flux_kohya_bfl_fixture():
    tensors, _ = _read("flux1_kohya_bfl")
    toplevel = {"img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer"}
    modules = {k.split(".")[0] for k in tensors}
    assert all(any(m == f"lora_unet_{t}" or m.startswith(f"lora_unet_{t}_") for m in modules) for t in toplevel)
    # diffusers 0.42.1 drops these modules silently; the strict oracle must say so.
    with pytest.raises(oracle.DiffusersOracleError, match="silently dropped.*x_embedder"):
        oracle.fused_weights("flux1", tensors)
    layout = {"lora_unet_" + k.replace(".", "_"): v for k, v in oracle.flux_bfl_layout(tiny_models.tiny_flux()).items()}
    base = oracle.base_weights("flux1")
    expected = _expected_from_bfl(base, tensors, layout, _flat_names("flux1"))
    fused = oracle.fused_weights("flux1", tensors, repair_flux_kohya_toplevel=True)
    _assert_deltas(base, fused, expected)


def test_flux_kohya_bfl_linear1_wide_fixture():
    tensors, _ = _read("flux1_kohya_bfl_linear1_wide")
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 1)
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # the layout needs names and shapes only
        wide_meta = FluxTransformer2DModel(**tiny_models.WIDE_FLUX_CONFIG)
    layout = {"lora_unet_" + k.replace(".", "_"): v for k, v in oracle.flux_bfl_layout(wide_meta).items()}
    base = oracle.base_weights("flux1", wide=True)
    expected = _expected_from_bfl(base, tensors, layout, {})
    _assert_deltas(base, oracle.fused_weights("flux1", tensors, wide=True), expected)


def test_bogus_keys_raise():
    tensors, header = _read("sd15_peft")
    bogus = "unet.down_blocks.0.attentions.0.bogus.lora_A.weight"
    tensors[bogus] = torch.zeros(4, 16)
    tensors[bogus.replace("lora_A", "lora_B")] = torch.zeros(16, 4)
    with pytest.raises(oracle.DiffusersOracleError, match=re.escape("down_blocks.0.attentions.0.bogus.lora_A.weight")):
        oracle.fused_weights("sd15", tensors, metadata=header)

    kohya, _ = _read("flux1_kohya_bfl")
    kohya["lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight"] = torch.zeros(4, 32)
    kohya["lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(oracle.DiffusersOracleError, match="img_attn_bogus"):
        oracle.fused_weights("flux1", kohya, repair_flux_kohya_toplevel=True)

    t5, _ = _read("flux1_kohya_bfl")  # diffusers' Flux loader filters T5 (lora_te3_) keys out without a message
    t5["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 32)
    t5["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(oracle.DiffusersOracleError, match="lora_te3_encoder_block_0"):
        oracle.fused_weights("flux1", t5, repair_flux_kohya_toplevel=True)


def test_text_encoder_keys_with_and_without_text_model_level_load_the_same():
    """transformers 5 CLIPTextModel has no ``text_model.`` level, so peft saves ``text_encoder.encoder.layers...``;
    files from transformers 4 say ``text_encoder.text_model.encoder.layers...``.  diffusers loads both alike."""
    tensors, header = _read("sd15_peft")
    assert any(k.startswith("text_encoder.encoder.layers.") for k in tensors)
    hf4 = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in tensors.items()}
    new = oracle.lora_deltas("sd15", tensors, metadata=header)
    old = oracle.lora_deltas("sd15", hf4, metadata=header)
    assert set(new) == set(old) and all(torch.equal(new[k], old[k]) for k in new)


@pytest.mark.parametrize("arch", oracle.ARCHS)
def test_tiny_models_have_full_size_key_names(arch):
    denoiser = {"sd15": tiny_models.tiny_sd15_unet, "sdxl": tiny_models.tiny_sdxl_unet, "flux1": tiny_models.tiny_flux,
                "flux2": tiny_models.tiny_flux2, "sd3": tiny_models.tiny_sd3}
    tiny = set(denoiser[arch]().state_dict())
    full = set(tiny_models.full_size_keys(arch))
    if arch in ("flux1", "flux2"):  # 2 + 2 blocks of Flux.1's 19 + 38 (FLUX.2 dev's 8 + 48)
        full = {k for k in full if not re.match(r"(single_)?transformer_blocks\.([2-9]|\d\d)\.", k)}
    assert tiny == full
