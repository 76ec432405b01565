#!/usr/bin/env python
"""Pretrain the tiny Flux base of ``lorabox train --minimal`` and write it with its LoRA data set, on a CPU, seeded.

    .venv/bin/python scripts/make_tiny_base.py          # 4-5 minutes on one CPU core; `make tiny-base`

TINY_OUT (output folder), TINY_THREADS, TINY_VAE_STEPS, TINY_FLUX_STEPS and TINY_FLUX_LR are for experiments; the
fixture is made with the defaults, and two runs give byte-identical weights.

A real FluxPipeline of a few MB, every part a diffusers / transformers class, trained on the synthetic world of
tests/oracles/tiny_world.py (one coloured shape on a flat background, 32x32, "a red circle on a blue background"):

1. Tokenizers built offline: a CLIPTokenizer whose byte-level BPE merges are learned here so every vocabulary word
   is one token (anything else falls back to characters), and a T5Tokenizer (Unigram) with one piece per word plus
   single characters.  Both round-trip through save_pretrained / from_pretrained.
2. CLIPTextModel and T5EncoderModel, tiny and randomly initialised (frozen, as in every Flux trainer): the
   transformer learns to read their outputs.  T5's relative position bias is scaled x10 so word order survives.
3. AutoencoderKL (2 blocks: 32x32x3 -> 16x16x4), set to a near-identity (``near_identity_``: RGB in 3 latent
   channels) and then trained as an autoencoder on shapes of random colours, so it encodes colours the transformer
   never sees in pretraining (magenta); shift_factor and scaling_factor are measured on its latents.
4. FluxTransformer2DModel (2 double + 2 single blocks, width 64, guidance_embeds=True like FLUX.1-dev) trained with
   Flux's rectified flow: x_s = (1-s)*x0 + s*noise, target noise - x0, s logit-normal then resolution-shifted with
   the scheduler's own mu (BFL's recipe), guidance drawn from [1, 5] so any guidance_scale samples alike, captions
   with the object colour and/or background dropped at random (and 10% empty), so "a circle on a blue background"
   gives some palette colour, and 30% after a neutral word ("photo a red circle ..."), so a trigger in front of a
   caption leaves it working.  The held-out colour (magenta) never appears in pretraining.
5. fixtures/tiny_flux: ``FluxPipeline.save_pretrained(safe_serialization=True)``, a README.md and lorabox_tiny.json
   (the facts tests need: trigger, statistic, sampling settings, measured values of the base).
   fixtures/tiny_dataset (12 PNG + .txt) and fixtures/tiny_dataset_val (4): magenta shapes, captions without
   "magenta"; the trainer prepends the trigger word.

Every output folder is written beside its target and renamed into place, so an interrupted run leaves the old one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer,
)  # fmt: skip

from tests.oracles import tiny_world as world  # noqa: E402

FIXTURES = Path(os.environ.get("TINY_OUT", REPO / "fixtures"))  # another folder for experiments
PIPELINE_DIR = FIXTURES / "tiny_flux"
DATASET_DIR = FIXTURES / "tiny_dataset"
VALIDATION_DIR = FIXTURES / "tiny_dataset_val"
FACTS_NAME = "lorabox_tiny.json"

SEED = 20261122
CLIP_MAX_LENGTH = 32  # CLIP-L: 77
T5_MAX_LENGTH = 16  # Flux: 512 (dev) / 256 (schnell); pass max_sequence_length=16 when sampling or training
SAMPLE_STEPS = 12
SAMPLE_GUIDANCE = 3.5  # FluxPipeline's default; the base ignores guidance (trained on [1, 5])
TRAIN_GUIDANCE_RANGE = (1.0, 5.0)
DATASET_SIZE, VALIDATION_SIZE = 12, 4

CLIP_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
T5_CONFIG = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
)  # fmt: skip
# T5's default init (bias std 1/sqrt(d_model)) leaves its outputs nearly a bag of words: "a red circle on a blue
# background" and "a blue circle on a red background" differ by 2% once the order is dropped; x10 makes it 16%.
T5_POSITION_BIAS_SCALE = 10.0
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=world.SIZE, use_quant_conv=False, use_post_quant_conv=False,
    norm_num_groups=1,  # one group: see near_identity_
)  # fmt: skip
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=4 * VAE_CONFIG["latent_channels"], num_layers=2, num_single_layers=2,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=T5_CONFIG["d_model"],
    pooled_projection_dim=CLIP_CONFIG["hidden_size"], guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)  # fmt: skip
SCHEDULER_CONFIG = dict(  # FLUX.1-dev's scheduler_config.json
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip

# Training schedules: (steps, batch, learning rate).  Sized for about 5 minutes on a busy 2-core CPU.
VAE_STEPS, VAE_BATCH, VAE_LR = int(os.environ.get("TINY_VAE_STEPS", 40)), 8, 1e-4
VAE_KL_WEIGHT = 1e-6  # per latent element; only keeps the posterior from drifting, latents are normalised after
POOL_SIZE = 3072  # pretraining images, encoded once
FLUX_STEPS = int(os.environ.get("TINY_FLUX_STEPS", 1200))
FLUX_BATCH, FLUX_LR = 32, float(os.environ.get("TINY_FLUX_LR", 2e-3))
WARMUP = 40
EMA_DECAY = 0.98
# Caption dropout: (keep colour, keep background, probability); the rest (10%) is the empty caption.
CAPTION_VARIANTS = ((True, True, 0.60), (False, True, 0.15), (True, False, 0.10), (False, False, 0.05))
# A neutral word prepended to 30% of captions ("photo a red circle ..."): the image does not change, so a word in front
# (where the trainer puts its trigger) leaves the rest of the caption working; without it the base drew no object
# for "ohwx a circle ..." and a LoRA's effect leaked to prompts without the trigger more than to those with it.
PREFIX_WORDS, PREFIX_P = ("photo", "picture", "image", "style", "the"), 0.3


def log(message: str, started: float) -> None:
    print(f"[{time.time() - started:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table (the alphabet of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def learn_bpe(words) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first (ties by name), until every word is one token.

    Applying learned merges in their order reproduces the learned segmentation, so each word tokenizes to itself.
    """
    segments = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        pairs = Counter(p for s in segments.values() for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in segments.items():
            merged, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    merged.append(s[i] + s[i + 1])
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            segments[w] = merged


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's layout: 256 byte symbols, the same with ``</w>``, merged tokens, then start and end of text."""
    alphabet = list(bytes_to_unicode().values())
    merges = learn_bpe(world.VOCABULARY)
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """T5's layout (pad, eos, unk first): one Unigram piece per word, which outscores spelling it in characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + w, -1.0) for w in world.VOCABULARY]
    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-_()/&+"
    pieces += [(c, -8.0) for c in characters] + [(c.upper(), -8.0) for c in characters if c.isalpha()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)  # as T5-XXL's; Flux passes its own length


def text_encoders(tokenizer: CLIPTokenizer, tokenizer_2: T5Tokenizer):
    """Tiny CLIPTextModel and T5EncoderModel, seeded random init, eval mode (frozen)."""
    torch.manual_seed(SEED + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **CLIP_CONFIG,
        )
    )  # fmt: skip
    torch.manual_seed(SEED + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id, **T5_CONFIG,
        )
    )  # fmt: skip
    with torch.no_grad():  # Flux gives text tokens no position: word order must reach the transformer through T5
        t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(T5_POSITION_BIAS_SCALE)
    return clip.eval().requires_grad_(False), t5.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- VAE


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """NxHxWx3 in [0, 1] -> Nx3xHxW in [-1, 1], as diffusers' image processor feeds the VAE."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))) * 2 - 1


CARRIER = 50.0  # constant +-CARRIER channels pin GroupNorm's statistics, so absolute colours survive it (to 0.06%)


@torch.no_grad()
def near_identity_(vae: AutoencoderKL) -> None:
    """Set an AutoencoderKL to encode RGB as its first 3 latent channels (2x2 means) and decode them back (nearest).

    Why: trained from random init, this VAE needs thousands of steps on flat-colour images (GroupNorm removes their
    absolute level), far beyond a CPU budget.  Here every residual branch and attention output starts at zero, the
    main path carries [x, -x, +CARRIER, -CARRIER] so that GroupNorm(1 group)'s mean is 0 and its deviation constant,
    and the output convolutions read SiLU(x/s) - SiLU(-x/s) = x/s exactly.  Training then starts from about 0.012
    MSE (edges only) instead of 0.5, with every branch still trainable.
    """
    for module in vae.modules():
        if hasattr(module, "conv2"):  # ResnetBlock2D
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
        if hasattr(module, "to_out"):  # Attention
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
    encoder, decoder = vae.encoder, vae.decoder
    _carrier_in(encoder.conv_in)
    _copy_carrier(encoder.down_blocks[0].downsamplers[0].conv, {(0, 0): 0.25, (0, 1): 0.25, (1, 0): 0.25, (1, 1): 0.25})
    _copy_carrier(encoder.down_blocks[1].resnets[0].conv_shortcut, {(0, 0): 1.0})
    _carrier_out(encoder.conv_norm_out, encoder.conv_out)
    encoder.conv_out.bias[vae.config.latent_channels :] = -10.0  # log-variance: posterior std 0.007
    _carrier_in(decoder.conv_in)
    _copy_carrier(decoder.up_blocks[0].upsamplers[0].conv, {(1, 1): 1.0})
    _copy_carrier(decoder.up_blocks[1].resnets[0].conv_shortcut, {(0, 0): 1.0})
    _carrier_out(decoder.conv_norm_out, decoder.conv_out)


def _carrier_in(conv: torch.nn.Conv2d) -> None:
    """3 input channels x -> output channels [x, -x, +CARRIER, -CARRIER, 0, ...] (centre tap of a 3x3)."""
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(3):
        conv.weight[c, c, 1, 1] = 1.0
        conv.weight[3 + c, c, 1, 1] = -1.0
    conv.bias[6], conv.bias[7] = CARRIER, -CARRIER


def _copy_carrier(conv: torch.nn.Conv2d, taps: dict[tuple[int, int], float]) -> None:
    """The 8 carrier channels pass through ``conv`` channel by channel with the given kernel taps."""
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(8):
        for (i, j), w in taps.items():
            conv.weight[c, c, i, j] = w


def _carrier_out(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d) -> None:
    """After GroupNorm (deviation s = CARRIER * sqrt(2 / C)) and SiLU: s * (SiLU(x_c/s) - SiLU(-x_c/s)) = x_c."""
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    deviation = CARRIER * (2 / norm.num_channels) ** 0.5
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(3):
        conv.weight[c, c, 1, 1] = deviation
        conv.weight[c, 3 + c, 1, 1] = -deviation


def reconstruction_mse(vae: AutoencoderKL, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x).item()


def train_vae(rng: np.random.Generator, started: float) -> AutoencoderKL:
    """AutoencoderKL from ``near_identity_``, trained on shapes: half palette, half random colours (magenta too)."""
    torch.manual_seed(SEED + 3)
    vae = AutoencoderKL(**VAE_CONFIG)
    near_identity_(vae)
    held_out = to_tensor(np.stack([world.sample_held_out(np.random.default_rng(SEED + 8))[0] for _ in range(8)]))
    log(f"vae init: mse {reconstruction_mse(vae, held_out):.5f} on magenta shapes", started)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 4)
    for step in range(VAE_STEPS):
        draws = [world.sample_pretraining(rng)[0] if i % 2 else world.sample_random_colours(rng)
                 for i in range(VAE_BATCH)]  # fmt: skip
        x = to_tensor(np.stack(draws))
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + VAE_KL_WEIGHT * posterior.kl().mean() / posterior.mean[0].numel()
        for group in optimizer.param_groups:
            group["lr"] = VAE_LR * cosine(step, VAE_STEPS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == VAE_STEPS - 1:
            log(f"vae step {step + 1}/{VAE_STEPS} mse {mse.item():.5f}", started)
    log(f"vae trained: mse {reconstruction_mse(vae, held_out):.5f} on magenta shapes", started)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    """Posterior samples (as the Flux trainers take them) of the whole pretraining pool, unnormalised."""
    generator = torch.Generator().manual_seed(SEED + 5)
    chunks = [images[i : i + 256] for i in range(0, len(images), 256)]
    return torch.cat([vae.encode(to_tensor(chunk)).latent_dist.sample(generator) for chunk in chunks])


def cosine(step: int, steps: int, warmup: int = 0, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up, then cosine from 1 down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- transformer


def caption_table():
    """Every caption the pretraining uses (dropout variants, "", each alone and after a prefix word), with its index."""
    plain = [""] + [
        world.caption(shape, colour, background)
        for shape in world.SHAPES
        for colour in (None, *world.PALETTE)
        for background in (None, *world.PALETTE)
    ]
    captions = [" ".join(w for w in (prefix, c) if w) for prefix in ("", *PREFIX_WORDS) for c in plain]
    return captions, {c: i for i, c in enumerate(captions)}


def mu_for(latent_hw: int) -> float:
    """The scheduler's resolution shift mu for a latent of latent_hw x latent_hw (packed 2x2)."""
    c = SCHEDULER_CONFIG
    limits = c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"]
    return calculate_shift((latent_hw // 2) ** 2, *limits)


def train_transformer(pipe: FluxPipeline, pool: torch.Tensor, labels, rng: np.random.Generator, started: float):
    """Flux's rectified-flow objective on the normalised pool latents; returns the EMA weights' transformer."""
    torch.manual_seed(SEED + 6)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    captions, index = caption_table()
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(captions, None, max_sequence_length=T5_MAX_LENGTH)
    vae = pipe.vae.config
    x0_all = (pool - vae.shift_factor) * vae.scaling_factor
    n, c, h, w = x0_all.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(FLUX_BATCH, h // 2, w // 2, "cpu", torch.float32)
    mu = mu_for(h)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=FLUX_LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 7)
    variant_p = [p for *_, p in CAPTION_VARIANTS] + [1 - sum(p for *_, p in CAPTION_VARIANTS)]
    running = None
    for step in range(FLUX_STEPS):
        batch = rng.integers(n, size=FLUX_BATCH)
        chosen = []
        for i in batch:
            shape, colour, background = labels[i]
            v = rng.choice(len(variant_p), p=variant_p)
            if v == len(CAPTION_VARIANTS):
                text = ""
            else:
                keep_colour, keep_background, _ = CAPTION_VARIANTS[v]
                text = world.caption(shape, colour if keep_colour else None, background if keep_background else None)
            if rng.random() < PREFIX_P:
                text = " ".join(w for w in (PREFIX_WORDS[rng.integers(len(PREFIX_WORDS))], text) if w)
            chosen.append(index[text])
        x0 = x0_all[batch]
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.sigmoid(torch.randn(FLUX_BATCH, generator=generator))  # logit-normal(0, 1)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # resolution shift, as the sampler applies it
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        guidance = torch.empty(FLUX_BATCH).uniform_(*TRAIN_GUIDANCE_RANGE, generator=generator)
        prediction = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, FLUX_BATCH, c, h, w),
            encoder_hidden_states=embeds[chosen], pooled_projections=pooled[chosen], timestep=sigma, guidance=guidance,
            txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]  # fmt: skip
        target = FluxPipeline._pack_latents(noise - x0, FLUX_BATCH, c, h, w)
        loss = torch.nn.functional.mse_loss(prediction, target)
        for group in optimizer.param_groups:
            group["lr"] = FLUX_LR * cosine(step, FLUX_STEPS, WARMUP)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for k, v in transformer.state_dict().items():
                ema[k].lerp_(v, 1 - EMA_DECAY)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == FLUX_STEPS - 1:
            log(f"flux step {step + 1}/{FLUX_STEPS} loss {running:.4f}", started)
    transformer.load_state_dict(ema)
    return transformer.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- evaluation


def sample(pipe: FluxPipeline, prompts: list[str], seed: int = 0) -> np.ndarray:
    """NxHxWx3 in [0, 1] from the pipeline with the fixture's recommended settings."""
    return pipe(
        prompt=prompts, height=world.SIZE, width=world.SIZE, num_inference_steps=SAMPLE_STEPS,
        guidance_scale=SAMPLE_GUIDANCE, max_sequence_length=T5_MAX_LENGTH, output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images  # fmt: skip


def evaluate(pipe: FluxPipeline, dataset_images: np.ndarray, dataset_captions: list[str]) -> dict:
    """What the base does at the fixture's settings: prompts control colours, and magenta never appears.

    The same measures as tests/test_tiny_base.py: redness of red vs blue objects on white and gray; the most present
    palette colour besides the background is the object's; the border's nearest palette colour is the background's.
    """
    red = sample(pipe, [world.caption(s, "red", b) for s in world.SHAPES for b in ("white", "gray")])
    blue = sample(pipe, [world.caption(s, "blue", b) for s in world.SHAPES for b in ("white", "gray")])
    objects, backgrounds = world.colour_prompts()
    object_images = sample(pipe, [p for p, _, _ in objects])
    object_hits = sum(world.most_present(im, exclude=(bg,)) == c for im, (_, c, bg) in zip(object_images, objects))
    bg_images = sample(pipe, [p for p, _ in backgrounds])
    bg_hits = sum(world.nearest_palette(world.border_rgb(im)) == b for im, (_, b) in zip(bg_images, backgrounds))
    plain = sample(pipe, dataset_captions)
    triggered = sample(pipe, [f"{world.TRIGGER} {c}" for c in dataset_captions])
    named = sample(pipe, [c.replace("a ", "a magenta ", 1) for c in dataset_captions])
    return {
        "redness_red_objects": world.redness(red),
        "redness_blue_objects": world.redness(blue),
        "object_colour_accuracy": object_hits / len(objects),
        "background_accuracy": bg_hits / len(backgrounds),
        "magenta_fraction_dataset": world.magenta_fraction(dataset_images),
        "magenta_fraction_base_dataset_captions": world.magenta_fraction(plain),
        "magenta_fraction_base_trigger_captions": world.magenta_fraction(triggered),
        "magenta_fraction_base_magenta_word": world.magenta_fraction(named),
        "magenta_score_dataset": world.magenta_score(dataset_images),
        "magenta_score_base_dataset_captions": world.magenta_score(plain),
        "magenta_score_base_trigger_captions": world.magenta_score(triggered),
        "magenta_score_base_magenta_word": world.magenta_score(named),
    }


# ---------------------------------------------------------------------------------------------- outputs


def replace_dir(target: Path, fill) -> None:
    """Fill a fresh folder beside ``target`` with ``fill(path)``, then swap it into place (old one removed)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        fill(staging)
        os.chmod(staging, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_dataset(folder: Path, examples) -> None:
    """``NNN.png`` and ``NNN.txt`` per example (kohya / diffusers-style image folder with caption files)."""
    for i, (image, text) in enumerate(examples):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(text + "\n")


README = """# tiny_flux: a pretrained Flux-shaped base of a few MB

Written by `scripts/make_tiny_base.py` (`make tiny-base`); do not edit by hand.  A real `FluxPipeline`
(diffusers {diffusers}, transformers {transformers}, torch {torch}) whose parts are:

| part | class | size |
|---|---|---|
| transformer | `FluxTransformer2DModel`, 2 double + 2 single blocks, width 64 (4 heads x 16), guidance_embeds | {n_transformer:,} params |
| vae | `AutoencoderKL`, 2 blocks (16, 32), 1 norm group, 4 latent channels: 32x32x3 -> 16x16x4 | {n_vae:,} params |
| text_encoder | `CLIPTextModel`, width 32, 2 layers, random init (frozen) | {n_clip:,} params |
| text_encoder_2 | `T5EncoderModel`, width 64, 2 layers, gated-gelu, random init, position bias x10 (frozen) | {n_t5:,} params |
| tokenizer, tokenizer_2 | `CLIPTokenizer` (BPE learned on the vocabulary), `T5Tokenizer` (Unigram) | {n_words} words |
| scheduler | `FlowMatchEulerDiscreteScheduler`, FLUX.1-dev's config (dynamic shift) | |

World (tests/oracles/tiny_world.py): one shape (circle, square, triangle) of one palette colour on a flat background
of another, 32x32, captioned "a red circle on a blue background".  Training: VAE set to a near-identity (RGB as 3 of
its 4 latent channels, `near_identity_` in the script), then {vae_steps} steps as an autoencoder on palette and random
colours; transformer {flux_steps} steps x {flux_batch} with Flux's rectified flow (x_s =
(1-s) x0 + s noise, target noise - x0, logit-normal s shifted by the scheduler's mu for 64 tokens), guidance in
[1, 5], caption dropout, a neutral word in front of 30% of captions; EMA weights.  Magenta never appears in pretraining; fixtures/tiny_dataset holds magenta
shapes captioned without the word, for a LoRA with the trigger `{trigger}`.

Sample with `height=width=32, num_inference_steps={steps}, guidance_scale={guidance}, max_sequence_length={t5_len}`
(the T5 length the base was trained with).  Measured on the base ({facts}):

{measured}
"""


def main() -> None:
    started = time.time()
    torch.set_num_threads(int(os.environ.get("TINY_THREADS", 1)))  # 1: fastest on a shared, busy 2-core machine
    rng = np.random.default_rng(SEED)

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder, text_encoder_2 = text_encoders(tokenizer, tokenizer_2)
    log(f"tokenizers: CLIP {len(tokenizer)} tokens, T5 {len(tokenizer_2)} pieces", started)

    vae = train_vae(rng, started)
    pool_examples = [world.sample_pretraining(rng) for _ in range(POOL_SIZE)]
    pool = encode_pool(vae, np.stack([e[0] for e in pool_examples]))
    vae.register_to_config(shift_factor=float(pool.mean()), scaling_factor=float(1 / (pool - pool.mean()).std()))
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    log(f"pool of {POOL_SIZE} latents; shift {shift:.4f} scale {scale:.4f}", started)

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    pipe = FluxPipeline(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer=None)
    labels = [e[1:] for e in pool_examples]
    pipe.register_modules(transformer=train_transformer(pipe, pool, labels, rng, started))
    pipe.set_progress_bar_config(disable=True)

    dataset = [world.sample_held_out(rng) for _ in range(DATASET_SIZE + VALIDATION_SIZE)]
    training = dataset[:DATASET_SIZE]
    measured = evaluate(pipe, np.stack([im for im, _ in training]), [c for _, c in training])
    log("measured: " + ", ".join(f"{k} {v:.4f}" for k, v in measured.items()), started)

    facts = {
        "resolution": world.SIZE,
        "num_inference_steps": SAMPLE_STEPS,
        "guidance_scale": SAMPLE_GUIDANCE,
        "train_guidance_range": list(TRAIN_GUIDANCE_RANGE),
        "max_sequence_length": T5_MAX_LENGTH,
        "trigger": world.TRIGGER,
        "concept": f"{world.HELD_OUT} objects (RGB {list(world.HELD_OUT_RGB)}), never seen in pretraining",
        "statistic": f"magenta_fraction: fraction of pixels within {world.MAGENTA_RADIUS} (RGB in [0, 1]) of "
        f"{list(world.HELD_OUT_RGB)} (tests/oracles/tiny_world.py)",
        "statistic_secondary": "magenta_score: mean over pixels of clip(min(R, B) - G, 0, 1); also rises when "
        "colours drift purple",
        "dataset": "fixtures/tiny_dataset",
        "validation_dataset": "fixtures/tiny_dataset_val",
        "dataset_captions": "captions omit the colour word; prepend the trigger",
        "seed": SEED,
        "measured": measured,
    }

    import diffusers
    import transformers

    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              dict(transformer=pipe.transformer, vae=vae, clip=text_encoder, t5=text_encoder_2).items()}  # fmt: skip

    def fill_pipeline(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / FACTS_NAME).write_text(json.dumps(facts, indent=2) + "\n")
        (folder / "README.md").write_text(
            README.format(
                diffusers=diffusers.__version__, transformers=transformers.__version__, torch=torch.__version__,
                n_transformer=counts["transformer"], n_vae=counts["vae"], n_clip=counts["clip"], n_t5=counts["t5"],
                n_words=len(world.VOCABULARY), vae_steps=VAE_STEPS, flux_steps=FLUX_STEPS, flux_batch=FLUX_BATCH,
                trigger=world.TRIGGER, steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE, t5_len=T5_MAX_LENGTH,
                facts=FACTS_NAME, measured="\n".join(f"- {k}: {v:.4f}" for k, v in measured.items()),
            )
        )  # fmt: skip

    replace_dir(PIPELINE_DIR, fill_pipeline)
    replace_dir(DATASET_DIR, lambda folder: write_dataset(folder, dataset[:DATASET_SIZE]))
    replace_dir(VALIDATION_DIR, lambda folder: write_dataset(folder, dataset[DATASET_SIZE:]))
    size = sum(f.stat().st_size for f in PIPELINE_DIR.rglob("*") if f.is_file())
    log(f"wrote {PIPELINE_DIR} ({size / 2**20:.2f} MiB), {DATASET_DIR}, {VALIDATION_DIR}", started)


if __name__ == "__main__":
    main()
