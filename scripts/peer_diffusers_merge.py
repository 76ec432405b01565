"""The peer for bench_merge.py: diffusers' own merge of a LoRA into a UNet folder (load, fuse_lora, save).

    .venv/bin/python scripts/peer_diffusers_merge.py UNET_FOLDER LORA RATIO OUT_FOLDER
"""
import sys

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

unet_dir, lora, ratio, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float16)
pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                 unet=unet, scheduler=None)
pipe.load_lora_weights(lora)
pipe.fuse_lora(lora_scale=ratio)
pipe.unload_lora_weights()
unet.save_pretrained(out, safe_serialization=True)
