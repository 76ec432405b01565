"""The merge against the peers: diffusers' load_lora_weights + fuse_lora on the same tiny model, ComfyUI's
calculate_weight on the same weight, and PEFT's DoRA merge."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorabox.io.safetensors import read_tensors, write_tensors
from lorabox.merge.engine import merge
from lorabox.tensor import Tensor
from tests.helpers import to_torch
from tests.oracles import tiny_models
from tests.oracles.comfy import comfy_apply, requires_comfy
from tests.oracles.diffusers_oracle import base_weights, fused_weights

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DENOISER = {"sd15": ("unet", tiny_models.tiny_sd15_unet), "sdxl": ("unet", tiny_models.tiny_sdxl_unet),
            "flux1": ("transformer", tiny_models.tiny_flux)}
CASES = [("sd15_peft", "sd15"), ("sd15_kohya_diffusers_names", "sd15"), ("sdxl_peft", "sdxl"),
         ("sdxl_kohya_sgm", "sdxl"), ("flux1_peft", "flux1"), ("flux1_kohya_bfl", "flux1")]


@pytest.mark.parametrize("name,arch", CASES, ids=[c[0] for c in CASES])
def test_merge_equals_diffusers_fuse_lora(tmp_path, name, arch):
    prefix, build = DENOISER[arch]
    folder = tmp_path / prefix
    build().save_pretrained(folder, safe_serialization=True)
    src = FIXTURES / f"{name}.safetensors"
    report = merge(folder, [(src, 1.0)], tmp_path / "merged", drop_unknown=True)  # text-encoder adapters: no TE here
    assert all(not d.startswith("unet:") for d in report.dropped)
    got, _ = read_tensors(next((tmp_path / "merged").glob("*.safetensors")))
    ref = fused_weights(arch, src, repair_flux_kohya_toplevel=(name == "flux1_kohya_bfl"))
    base = base_weights(arch)
    changed = 0
    for key, t in got.items():
        want = ref[f"{prefix}.{key}"]
        have = torch.from_numpy(t.values())
        assert (have - want.double()).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), key
        changed += not torch.equal(want, base[f"{prefix}.{key}"])
    assert changed >= report.merged > 0


@requires_comfy
@pytest.mark.parametrize("dialect", ["kohya", "comfyui"])
def test_merge_equals_comfy_calculate_weight(tmp_path, dialect):
    """Same fused weight, same LoRA: lorabox's merge equals ComfyUI's patched weight (float32)."""
    from lorabox.conversion import convert
    from tests.helpers import random_lora

    rng = np.random.default_rng(0)
    lora = random_lora("flux1", every=1, rank=2, slices=True, alpha=3.0, text_encoders=False)
    res = convert(lora, dialect)
    write_tensors(tmp_path / "l.safetensors", res.tensors, res.metadata)
    names = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1"]
    base = {n + ".weight": Tensor.from_values(rng.standard_normal((6 * s, 16)), "F32")
            for n, s in zip(names, (3, 7, 1))}
    base["final_layer.adaLN_modulation.1.weight"] = Tensor.from_values(rng.standard_normal((6, 16)), "F32")
    write_tensors(tmp_path / "base.safetensors", base)
    merge(tmp_path / "base.safetensors", [(tmp_path / "l.safetensors", 0.8)], tmp_path / "o.safetensors",
          drop_unknown=True)
    out, _ = read_tensors(tmp_path / "o.safetensors")
    for key in base:
        w = torch.from_numpy(base[key].values()).float()
        want = comfy_apply("flux1", to_torch(res.tensors), "diffusion_model." + key, w, strength=0.8)
        assert (torch.from_numpy(out[key].values()).float() - want).abs().max() <= 1e-5, key


def test_dora_merge_equals_peft(tmp_path):
    """PEFT DoRA on a tiny Flux: our merge (PEFT convention) equals PEFT's merge_and_unload weights."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = tiny_models.tiny_flux()
    folder = tmp_path / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["to_q", "to_k", "proj_mlp", "norm_out.linear"])
    model.add_adapter(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    sd = {f"transformer.{k}": v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_dora": True}
    write_tensors(tmp_path / "dora.safetensors", {k: Tensor(v.numpy(), "F32") for k, v in sd.items()},
                  {"lora_adapter_metadata": json.dumps(meta)})
    model.fuse_lora(lora_scale=0.6)  # PEFT's DoRA merge (DoraLinearVariant), then drop the LoRA layers
    model.unload_lora()
    ref = {k: v.detach() for k, v in model.state_dict().items()}
    merge(folder, [(tmp_path / "dora.safetensors", 0.6)], tmp_path / "merged")
    got, _ = read_tensors(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    touched = 0
    for key, t in got.items():
        want = ref[key]
        have = torch.from_numpy(t.values())
        assert (have - want.double()).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), key
        touched += key.endswith(("to_q.weight", "proj_mlp.weight"))
    assert touched


# Non-LoRA parameters of the original checkpoints: diffusers name pattern -> original name (re.fullmatch, re.sub).
_DOUBLE, _SINGLE = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
ORIGINAL_EXTRAS = {
    "flux2": [(_DOUBLE + rf"attn\.{d}\.weight", rf"double_blocks.\1.{o}.scale")
              for d, o in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                           ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm"))]
             + [(_SINGLE + rf"attn\.{d}\.weight", rf"single_blocks.\1.norm.{o}.scale")
                for d, o in (("norm_q", "query_norm"), ("norm_k", "key_norm"))],
    "sd3": [(r"pos_embed\.pos_embed", "pos_embed")]
           + [(_DOUBLE + rf"{d}\.weight", rf"joint_blocks.\1.{o}.weight")
              for d, o in (("attn.norm_q", "x_block.attn.ln_q"), ("attn.norm_k", "x_block.attn.ln_k"),
                           ("attn.norm_added_q", "context_block.attn.ln_q"),
                           ("attn.norm_added_k", "context_block.attn.ln_k"),
                           ("attn2.norm_q", "x_block.attn2.ln_q"), ("attn2.norm_k", "x_block.attn2.ln_k"))],
}


def _converter(arch: str):
    from diffusers.loaders import single_file_utils as sfu

    return {"flux2": sfu.convert_flux2_transformer_checkpoint_to_diffusers,
            "sd3": sfu.convert_sd3_transformer_checkpoint_to_diffusers}[arch]


def _original_checkpoint(arch: str, model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A tiny model's weights in the original (BFL / SAI) names: the table's canonical names with fused qkv and the
    original adaLN order, biases likewise, the other parameters by ORIGINAL_EXTRAS. It is an original checkpoint
    because diffusers' own single-file converter turns it back into exactly the model's state dict (asserted)."""
    import re

    from lorabox.keymap import load_table
    from lorabox.ops import ROW_OPS

    state = model.state_dict()
    sd = {}
    for m in load_table(arch).modules.values():
        for param in ("weight", "bias"):
            if f"{m.diffusers[0]}.{param}" not in state:
                continue
            w = torch.cat([state[f"{d}.{param}"] for d in m.diffusers])
            if m.op:  # diffusers' layout -> canonical: the inverse row op
                w = w[torch.from_numpy(ROW_OPS[m.op][1](w.shape[0]))]
            sd[f"{m.canonical}.{param}"] = w.clone()
    for key, value in state.items():
        for pattern, original in ORIGINAL_EXTRAS[arch]:
            if re.fullmatch(pattern, key):
                sd[re.sub(pattern, original, key)] = value.clone()
    back = _converter(arch)({prefix + k: v for k, v in sd.items()})
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    return {prefix + k: v for k, v in sd.items()}


MMDIT_MERGES = [("flux2", "bfl", ""), ("flux2", "diffusers", None), ("sd3", "single_file", "model.diffusion_model."),
                ("sd3", "diffusers", None)]


@pytest.mark.parametrize("arch,layout,prefix", MMDIT_MERGES, ids=[f"{a}-{b}" for a, b, _ in MMDIT_MERGES])
def test_mmdit_merge_equals_diffusers_fuse_lora(tmp_path, arch, layout, prefix):
    """lorabox merge into a tiny FLUX.2 / SD3 base (an original single file, or a diffusers folder) equals diffusers'
    fuse_lora of the same LoRA, compared in diffusers' names (single files go back through diffusers' converter)."""
    import safetensors.torch

    from tests.test_diffusers_peer_mmdit import TINY, lora_for, write

    model = TINY[arch]()
    if layout == "diffusers":
        base, out = tmp_path / "transformer", tmp_path / "merged"
        model.save_pretrained(base, safe_serialization=True)
    else:
        base, out = tmp_path / "base.safetensors", tmp_path / "merged.safetensors"
        safetensors.torch.save_file(_original_checkpoint(arch, model, prefix), base)
    lora = write(lora_for(arch), "diffusers", tmp_path / "lora.safetensors")
    report = merge(base, [(lora, 1.0)], out)
    assert (report.architecture, report.layout) == (arch, layout)
    got = safetensors.torch.load_file(out if layout != "diffusers" else next(out.glob("*.safetensors")))
    if layout != "diffusers":
        got = _converter(arch)(got)
    ref, before = fused_weights(arch, lora), base_weights(arch)
    assert {f"transformer.{k}" for k in got} == {k for k in ref if k.startswith("transformer.")}
    changed = 0
    for key, have in got.items():
        want = ref[f"transformer.{key}"]
        assert (have.double() - want.double()).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), key
        changed += not torch.equal(want, before[f"transformer.{key}"])
    assert changed >= report.merged > 0  # a fused qkv is one merged tensor, three diffusers ones
