"""The PEFT peer for bench_merge.py: PEFT's own merge of a LoRA into a UNet folder (`LoraModel.merge_and_unload`).

diffusers reads the kohya file into PEFT's names and a `LoraConfig` (`lora_state_dict`, `convert_unet_state_dict_to_peft`,
`get_peft_kwargs`), as its `load_lora_weights` does; the rest is PEFT's API: `LoraModel` (the adapter injected),
`set_peft_model_state_dict`, each LoRA layer scaled by the ratio, then `merge_and_unload`, and diffusers'
`save_pretrained`.

    .venv/bin/python scripts/peer_peft_merge.py UNET_FOLDER LORA RATIO OUT_FOLDER
"""
import sys

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs
from peft import LoraConfig, LoraModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer


def peft_adapter(lora: str, unet_config) -> tuple[dict, LoraConfig]:
    """The UNet part of a kohya LoRA in PEFT's names, and its `LoraConfig` (ranks and alphas) as diffusers makes it.
    `unet_config` maps SGM block names (`input_blocks.4.1`) to diffusers' ones, as `load_lora_weights` does."""
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(lora, unet_config=unet_config)
    sd = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")})
    alphas = {k[len("unet."):]: v for k, v in (alphas or {}).items() if k.startswith("unet.")}
    ranks = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    return sd, LoraConfig(**get_peft_kwargs(ranks, network_alpha_dict=alphas, peft_state_dict=sd, is_unet=True))


def main() -> None:
    unet_dir, lora, ratio, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float16)
    sd, config = peft_adapter(lora, unet.config)
    model = LoraModel(unet, config, "default")  # injects the adapter into `unet` in place
    loaded = set_peft_model_state_dict(unet, sd)
    if loaded.unexpected_keys:
        raise SystemExit(f"PEFT left {len(loaded.unexpected_keys)} LoRA keys unused: {loaded.unexpected_keys[:3]}")
    for layer in unet.modules():
        if isinstance(layer, LoraLayer):
            layer.scale_layer(ratio)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    main()
