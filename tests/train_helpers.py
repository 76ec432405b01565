"""Tiny trainable bases and data sets for tests/test_train.py, built from diffusers / transformers classes.

The FLUX.1 base's transformer and text encoders are those of tests/oracles/tiny_models.py (same configs, same
seeds), so an adapter trained on it loads into the diffusers oracle's pipeline. Tokenizers are built from a
character vocabulary (no download); the VAE is a two-level AutoencoderKL (2x downsampling).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.oracles import tiny_models

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in CHARS]
    uni = Tokenizer(models.Unigram(pieces, unk_id=2))
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=uni, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_vae(latent_channels: int = 4, seed: int = 7):
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                             latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, sample_size=32,
                             scaling_factor=0.5, shift_factor=0.1)


def make_tiny_flux_base(folder: Path) -> Path:
    """A FluxPipeline folder (save_pretrained) with the oracle's tiny transformer and encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=tiny_vae(), text_encoder=tiny_models.tiny_clip_l(),
                        tokenizer=clip_tokenizer(folder / "_tok"), text_encoder_2=tiny_models.tiny_t5(),
                        tokenizer_2=t5_tokenizer(), transformer=tiny_models.tiny_flux())
    pipe.save_pretrained(folder)
    (folder / "lorabox_tiny.json").write_text(json.dumps({"train_defaults": {
        "resolution": 32, "max_sequence_length": 16, "sample_steps": 4, "sample_guidance": 1.0,
        "gradient_checkpointing": False, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3}}))
    return folder


def make_sd15_base(folder: Path) -> Path:
    """A StableDiffusionPipeline folder with the oracle's tiny SD1.5 UNet and CLIP, DDPM-family scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_models.tiny_clip_l(),
                                   tokenizer=clip_tokenizer(folder / "_tok"), unet=tiny_models.tiny_sd15_unet(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    (folder / "lorabox_tiny.json").write_text(json.dumps({"train_defaults": {
        "resolution": 32, "sample_steps": 3, "sample_guidance": 2.0, "gradient_checkpointing": False, "rank": 4,
        "alpha": 4.0, "learning_rate": 1e-3}}))
    return folder


def make_sdxl_base(folder: Path) -> Path:
    """A StableDiffusionXLPipeline folder with the oracle's tiny SDXL UNet, CLIP-L and CLIP-G, epsilon scheduler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_models.tiny_clip_l(),
                                     text_encoder_2=tiny_models.tiny_clip_g(), tokenizer=clip_tokenizer(folder / "_t1"),
                                     tokenizer_2=clip_tokenizer(folder / "_t2"), unet=tiny_models.tiny_sdxl_unet(),
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    (folder / "lorabox_tiny.json").write_text(json.dumps({"train_defaults": {
        "resolution": 32, "sample_steps": 3, "sample_guidance": 2.0, "gradient_checkpointing": False, "rank": 4,
        "alpha": 4.0, "learning_rate": 1e-3}}))
    return folder


def make_images(folder: Path, n: int = 4, *, size=(32, 32), caption="a red square", seed: int = 0) -> Path:
    """n PNGs (a bright square on a dark, noisy background) with same-named captions."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((size[1], size[0], 3)) * 40).astype(np.uint8)
        y, x = rng.integers(0, size[1] // 2), rng.integers(0, size[0] // 2)
        arr[y:y + size[1] // 2, x:x + size[0] // 2] = (220, 30, 30)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder
