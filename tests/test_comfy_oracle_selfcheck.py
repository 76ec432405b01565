"""Self-check of the ComfyUI oracle (tests/oracles/comfy.py).

Synthetic LoRAs are built from ComfyUI's own key map, so ComfyUI must load every key of them; a bogus key
must be reported. A few known rejections are pinned too, so a change of ComfyUI version shows up here.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.oracles.comfy import (
    ARCHS,
    assert_comfy_loads_all,
    comfy_apply,
    comfy_key_map,
    comfy_load,
    comfy_target_shape,
    comfy_unloaded_keys,
    comfy_weight_shapes,
    requires_comfy,
)

pytestmark = requires_comfy

RANK = 2


def lora_tensors(module: str, shape: tuple[int, ...], style: str = "kohya", seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA for a weight of `shape` ([out, in] or a conv [out, in, kh, kw]) under module name `module`."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f, *kernel = shape
    down = torch.randn(RANK, in_f, *kernel, generator=g)
    up = torch.randn(out_f, RANK, *([1] * len(kernel)), generator=g)
    if style == "kohya":
        alpha = torch.tensor(1.0)
        return {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": alpha}
    return {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}


def lora_for(arch: str, modules: list[str]) -> dict[str, torch.Tensor]:
    """kohya suffixes for `lora_*`/`lycoris_*` names, PEFT suffixes for dotted names (ComfyUI takes both)."""
    sd = {}
    for i, module in enumerate(modules):
        style = "kohya" if re.match(r"(lora|lycoris)_", module) else "peft"
        sd.update(lora_tensors(module, comfy_target_shape(arch, module), style, seed=i))
    return sd


def dialect(module: str) -> str:
    """A key map entry's naming family: the part before its first block index (`lora_unet_input_blocks_`)."""
    return re.split(r"(?<=[._])\d+(?=[._]|$)", module)[0]


def sample_modules(arch: str, per_dialect: int = 2) -> list[str]:
    """A few key map entries of every naming family whose target is a real >= 2-D weight."""
    shapes = comfy_weight_shapes(arch)
    picked: dict[str, list[str]] = {}
    for module, target in comfy_key_map(arch).items():
        name = target if isinstance(target, str) else target[0]
        if name in shapes and len(shapes[name]) >= 2 and len(picked.setdefault(dialect(module), [])) < per_dialect:
            picked[dialect(module)].append(module)
    return [m for ms in picked.values() for m in ms]


def without_aliases(arch: str, modules: list[str]) -> list[list[str]]:
    """Split `modules` into groups in which no two modules name the same weight (ComfyUI would keep only
    one patch of such a pair)."""
    key_map = comfy_key_map(arch)
    groups: list[tuple[set, list[str]]] = []
    for module in modules:
        group = next((g for g in groups if key_map[module] not in g[0]), None)
        if group is None:
            group = (set(), [])
            groups.append(group)
        group[0].add(key_map[module])
        group[1].append(module)
    return [g[1] for g in groups]


# Names lorabox must produce, per ComfyUI, with the weight each one must patch.
NAMED = {
    "flux2": {
        "lora_unet_double_blocks_7_txt_attn_qkv": "diffusion_model.double_blocks.7.txt_attn.qkv.weight",
        "diffusion_model.single_stream_modulation.lin": "diffusion_model.single_stream_modulation.lin.weight",
        "lora_unet_single_blocks_47_linear2": "diffusion_model.single_blocks.47.linear2.weight",
    },
    "sd3": {
        "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1":
            "diffusion_model.joint_blocks.23.context_block.adaLN_modulation.1.weight",
        "diffusion_model.joint_blocks.12.x_block.attn2.proj":
            "diffusion_model.joint_blocks.12.x_block.attn2.proj.weight",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": "clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    },
    "sd35_large": {
        "lora_unet_joint_blocks_37_x_block_mlp_fc2": "diffusion_model.joint_blocks.37.x_block.mlp.fc2.weight",
        "diffusion_model.joint_blocks.23.context_block.attn.proj":
            "diffusion_model.joint_blocks.23.context_block.attn.proj.weight",
    },
    "sd15": {
        "lora_unet_down_blocks_0_attentions_0_proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight",
        "lora_unet_input_blocks_1_1_proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight",
        "lora_unet_down_blocks_0_resnets_0_conv1": "diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1":
            "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    },
    "sdxl": {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2":
            "diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q":
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2":
            "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj":
            "clip_g.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.v_proj":
            "clip_g.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight",
    },
    "flux1": {
        "lora_unet_double_blocks_0_img_attn_qkv": "diffusion_model.double_blocks.0.img_attn.qkv.weight",
        "lora_unet_single_blocks_37_linear1": "diffusion_model.single_blocks.37.linear1.weight",
        "diffusion_model.single_blocks.0.linear1": "diffusion_model.single_blocks.0.linear1.weight",
        "transformer.transformer_blocks.0.attn.to_k": "diffusion_model.double_blocks.0.img_attn.qkv.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q":
            "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
        "lora_te2_encoder_block_23_layer_1_DenseReluDense_wo":
            "t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wo.weight",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q":
            "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight",
    },
}


@pytest.mark.parametrize("arch", ARCHS)
def test_key_map_sample_loads_fully(arch):
    modules = sample_modules(arch)
    assert len({dialect(m) for m in modules}) >= 40  # every naming family is exercised
    for group in without_aliases(arch, modules):
        patches = assert_comfy_loads_all(arch, lora_for(arch, group))
        assert len(patches) == len(group)


@pytest.mark.parametrize("arch", ARCHS)
def test_named_keys_load_and_hit_their_weight(arch):
    for module, weight in NAMED[arch].items():
        patches = assert_comfy_loads_all(arch, lora_for(arch, [module]))
        targets = [t if isinstance(t, str) else t[0] for t in patches]
        assert targets == [weight], module


@pytest.mark.parametrize("arch", ARCHS)
def test_bogus_key_is_reported(arch):
    good = next(iter(NAMED[arch]))
    sd = lora_for(arch, [good])
    bogus = {
        "lora_unet_nonexistent_block.lora_down.weight": torch.zeros(RANK, 8),
        "lora_unet_nonexistent_block.lora_up.weight": torch.zeros(8, RANK),
        f"{good}.lora_mystery.weight": torch.zeros(1),  # right module, unknown suffix
    }
    assert comfy_unloaded_keys(arch, {**sd, **bogus}) == sorted(bogus)
    assert comfy_unloaded_keys(arch, {"lora_unet_nonexistent_block.lora_down.weight": torch.zeros(RANK, 8)}) == [
        "lora_unet_nonexistent_block.lora_down.weight"
    ]


def test_known_rejections_are_pinned():
    """ComfyUI 0.3.75 behaviour lorabox must respect when it writes ComfyUI-bound files."""

    def unloaded(arch, module, shape, style="kohya"):
        return comfy_unloaded_keys(arch, lora_tensors(module, shape, style))

    # SD1.5/SDXL: diffusers attention names are only read in the old `.processor.to_q` form, so PEFT-style
    # `unet.….attn1.to_q` is dropped (other diffusers UNet names, e.g. proj_in, are read).
    peft = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unloaded("sdxl", peft, (640, 640), "peft") == [f"{peft}.lora_A.weight", f"{peft}.lora_B.weight"]
    assert unloaded("sdxl", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q", (640, 640)) == []
    assert unloaded("sdxl", "unet.down_blocks.1.attentions.0.proj_in", (640, 640), "peft") == []
    # Flux: diffusers' T5 prefix `text_encoder_2.` is not read (lora_te2_/lora_te3_/text_encoders.t5xxl. are),
    # nor is a CLIP name without transformers 4's `text_model.` level.
    assert unloaded("flux1", "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", (4096, 4096), "peft") != []
    assert unloaded("flux1", "text_encoder.encoder.layers.0.self_attn.q_proj", (768, 768), "peft") != []
    # Flux: kohya-flattened diffusers names are read as `lora_transformer_…` (OneTrainer), not `lora_unet_…`.
    assert unloaded("flux1", "lora_unet_transformer_blocks_0_attn_to_q", (3072, 3072)) != []
    assert unloaded("flux1", "lora_transformer_transformer_blocks_0_attn_to_q", (3072, 3072)) == []
    # The diffusers->LDM table maps modules the model lacks: load_lora consumes the keys, the patch lands nowhere.
    result = comfy_load("sdxl", lora_tensors("lora_unet_down_blocks_0_resnets_0_conv_shortcut", (320, 320)))
    assert result.unloaded_keys == []
    assert result.unpatched_weights == ["diffusion_model.input_blocks.1.0.skip_connection.weight"]
    # Two names of one module: every key is consumed, but only one patch survives.
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    diffusers = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    result = comfy_load("sdxl", {**lora_tensors(sgm, (640, 640), seed=1), **lora_tensors(diffusers, (640, 640), seed=2)})
    assert result.unloaded_keys == [] and len(result.patches) == 1
    target = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert result.collisions == {target: sorted([sgm, diffusers])}


def test_merge_numbers():
    # SD1.5 text encoder: W' = W + strength * alpha / rank * up @ down.
    module = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd = lora_tensors(module, (768, 768))
    weight = torch.randn(768, 768)
    name = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    merged = comfy_apply("sd15", sd, name, weight, strength=0.8)
    expected = weight + 0.8 * (1.0 / RANK) * sd[f"{module}.lora_up.weight"] @ sd[f"{module}.lora_down.weight"]
    torch.testing.assert_close(merged, expected)
    # Flux: a diffusers `to_k` lands in rows [3072:6144] of the fused qkv weight, nothing else moves.
    module = "transformer.transformer_blocks.0.attn.to_k"
    sd = lora_tensors(module, (3072, 3072), "peft")
    qkv = comfy_apply("flux1", sd, "diffusion_model.double_blocks.0.img_attn.qkv.weight", torch.zeros(9216, 3072))
    torch.testing.assert_close(qkv[3072:6144], sd[f"{module}.lora_B.weight"] @ sd[f"{module}.lora_A.weight"])
    assert not qkv[:3072].any() and not qkv[6144:].any()
