"""Spellings lorabox reads but does not write: each is derived from a written file by the renaming rule that
tool uses, then read back; the effective delta of every weight must be unchanged."""
import re

import pytest

from lorabox.conversion import convert, lora_from_state_dict
from tests.helpers import assert_same_deltas, random_lora


def _flat(name):
    return name.replace(".", "_")


def respell(sd, rule):
    return {rule(k): v for k, v in sd.items()}


def diffusers_old(k):
    """diffusers <= 0.20 attention processors (UNet) and training-script `lora_linear_layer` (text encoders)."""
    m = re.match(r"(unet\..*\.attn\d)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight$", k)
    if m:
        proj = m.group(2).replace(".0", "")
        return f"{m.group(1)}.processor.{proj}_lora.{'down' if m.group(3) == 'A' else 'up'}.weight"
    if k.startswith("unet."):
        return k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
    return k.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(".lora_B.weight", ".lora_linear_layer.up.weight")


def kohya_diffusers_names(k):
    """ai-toolkit / diffusers' convert_state_dict_to_kohya: `lora_unet_` + flattened diffusers names."""
    for pre, new in (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_")):
        if k.startswith(pre):
            stem, suffix = k[len(pre):].rsplit(".lora_", 1)
            return new + _flat(stem) + ".lora_" + suffix.replace("A.weight", "down.weight").replace("B.weight", "up.weight")
    raise AssertionError(k)


def lycoris(k):
    if k.startswith("unet.") or k.startswith("transformer."):
        stem, suffix = k.split(".", 1)[1].rsplit(".lora_", 1)
        return "lycoris_" + _flat(stem) + ".lora_" + suffix.replace("A.weight", "down.weight").replace("B.weight", "up.weight")
    return k


def onetrainer_flux(k):
    if k.startswith("transformer."):
        stem, suffix = k[len("transformer."):].rsplit(".lora_", 1)
        return "lora_transformer_" + _flat(stem) + ".lora_" + suffix
    return k


def raw_peft(k):
    return k.replace("transformer.", "base_model.model.", 1).replace("unet.", "base_model.model.", 1) \
        if k.startswith(("transformer.", "unet.")) else k


def diffsynth(k):
    return k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


def xlabs(k):
    """xlabs-ai Flux: double-block attention as processor LoRAs (`qkv_lora1` = image stream), no prefix."""
    m = re.match(r"double_blocks\.(\d+)\.(img|txt)_attn\.(qkv|proj)\.lora_([AB])\.weight$", k)
    if not m:
        return k
    i, stream, kind, ab = m.groups()
    return f"double_blocks.{i}.processor.{kind}_lora{1 if stream == 'img' else 2}.{'down' if ab == 'A' else 'up'}.weight"


def comfy_peft_suffixes(k):
    """ai-toolkit for most architectures: `diffusion_model.` + original names with PEFT suffixes."""
    return "diffusion_model." + k


def kohya_t5_onetrainer(k):
    return k.replace("lora_te3_", "lora_te2_")


CASES = [
    ("sd15", "diffusers", diffusers_old, True),
    ("sdxl", "diffusers", diffusers_old, True),
    ("sd15", "diffusers", kohya_diffusers_names, True),
    ("sdxl", "diffusers", kohya_diffusers_names, True),
    ("sdxl", "diffusers", lycoris, False),
    ("flux1", "diffusers", lycoris, False),
    ("flux1", "diffusers", onetrainer_flux, False),
    ("flux1", "diffusers", raw_peft, False),
    ("sdxl", "diffusers", raw_peft, False),
    ("flux1", "diffusers", diffsynth, True),
    ("flux1", "bfl", xlabs, False),
    ("flux1", "bfl", comfy_peft_suffixes, False),
    ("flux1", "kohya", kohya_t5_onetrainer, True),
]


@pytest.mark.parametrize("arch,written,rule,te", CASES, ids=[f"{a}-{r.__name__}" for a, _, r, _ in CASES])
def test_read_spelling(arch, written, rule, te):
    lora = random_lora(arch, every=2, alpha=4.0, text_encoders=te)  # alpha == rank: spellings without alpha agree
    res = convert(lora, written)
    sd = respell(res.tensors, rule)
    assert sd.keys() != res.tensors.keys()
    if written == "kohya":
        assert any(k.startswith("lora_te2_") for k in sd)
    back = lora_from_state_dict(sd, res.metadata)
    assert back.architecture == arch
    assert_same_deltas(lora, back)
    for target in ("kohya", "comfyui", "diffusers"):
        out = convert(back, target)
        assert_same_deltas(lora, lora_from_state_dict(out.tensors, out.metadata))


def test_peft_metadata_alpha_is_honoured():
    """A diffusers file whose lora_adapter_metadata says lora_alpha != r: the scale comes from the metadata."""
    import json

    lora = random_lora("flux1", every=5, alpha=4.0, text_encoders=False)
    res = convert(lora, "diffusers")
    meta = dict(res.metadata)
    cfg = json.loads(meta["lora_adapter_metadata"])
    cfg["transformer.lora_alpha"] = 8  # rank 4: scale 2
    meta["lora_adapter_metadata"] = json.dumps(cfg)
    back = lora_from_state_dict(res.tensors, meta)
    for a in back.adapters.values():
        assert a.scale == 2.0
