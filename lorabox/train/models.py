"""Bases: a diffusers pipeline folder, and how each architecture encodes, normalises latents and calls its denoiser.

What differs between architectures is small and lives in `Family` subclasses of ~20 lines: which encode_prompt
outputs to keep, how VAE latents are normalised (SD: z * scale; SD3 / FLUX.1: (z - shift) * scale; FLUX.2: 2x2
patchify, then the VAE's batch-norm statistics), how the denoiser is called (FLUX packs 2x2 patches into tokens and
takes s in [0, 1]; SD3 takes 1000 s; UNets take integer t) and which arguments the pipeline takes for sampling.
Latents are kept unpacked (B, C, H, W) everywhere else: packing is a permutation, so the loss is the same.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from ..errors import TrainingError
from .objectives import RESOLUTION_SHIFT, Objective, alphas_cumprod, base_objective, check_objective

# model_index.json `_class_name` -> (family, key-map architecture)
PIPELINES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux1",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2",
}


class Family:
    """How one architecture is trained. Subclasses fill in the per-architecture parts."""

    name = ""
    denoiser = "transformer"
    prompt_outputs: tuple[str, ...] = ()  # names of the encode_prompt outputs kept (cached per caption)

    def __init__(self, pipe, config):
        self.pipe = pipe
        self.config = config

    # prompts
    def encode(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample_kwargs(self, cond: dict, uncond: dict) -> dict:
        """Pipeline arguments for one prompt from cached embeddings (so text encoders need not stay loaded)."""
        return {k: v for k, v in cond.items()}

    # latents
    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides are multiples of this (VAE downsampling x patch size)."""
        return self.vae_factor * 2

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae.config
        return (z - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor

    def seq_len(self, latent_shape) -> int:
        """Image tokens the denoiser sees (the resolution shift's input)."""
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)

    # denoiser
    def predict(self, model, noisy: torch.Tensor, timestep: torch.Tensor, cond: dict, guidance: float | None):
        raise NotImplementedError


class SD15(Family):
    name = "sd15"
    denoiser = "unet"
    prompt_outputs = ("prompt_embeds",)

    @property
    def pixel_multiple(self) -> int:
        return self.vae_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    def normalise(self, z):
        return z * self.pipe.vae.config.scaling_factor

    def encode(self, prompts, device):
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
        return {"prompt_embeds": embeds}

    def sample_kwargs(self, cond, uncond):
        return {"prompt_embeds": cond["prompt_embeds"], "negative_prompt_embeds": uncond["prompt_embeds"]}

    def predict(self, model, noisy, timestep, cond, guidance):
        return model(noisy, timestep, encoder_hidden_states=cond["prompt_embeds"], return_dict=False)[0]


class SDXL(SD15):
    name = "sdxl"
    prompt_outputs = ("prompt_embeds", "pooled_prompt_embeds")

    def encode(self, prompts, device):
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def sample_kwargs(self, cond, uncond):
        return {**cond, "negative_prompt_embeds": uncond["prompt_embeds"],
                "negative_pooled_prompt_embeds": uncond["pooled_prompt_embeds"]}

    def predict(self, model, noisy, timestep, cond, guidance):
        h, w = noisy.shape[-2] * self.vae_factor, noisy.shape[-1] * self.vae_factor
        # SDXL micro-conditioning: original size, crop top-left, target size (no crop: buckets resize whole images)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=noisy.device, dtype=noisy.dtype).repeat(noisy.shape[0], 1)
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids}
        return model(noisy, timestep, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                     return_dict=False)[0]


class SD3(Family):
    name = "sd3"
    prompt_outputs = ("prompt_embeds", "pooled_prompt_embeds")

    @property
    def pixel_multiple(self) -> int:
        return self.vae_factor * self.pipe.transformer.config.patch_size

    def encode(self, prompts, device):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.config.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def sample_kwargs(self, cond, uncond):
        return {**cond, "negative_prompt_embeds": uncond["prompt_embeds"],
                "negative_pooled_prompt_embeds": uncond["pooled_prompt_embeds"]}

    def predict(self, model, noisy, timestep, cond, guidance):
        return model(hidden_states=noisy, timestep=timestep * 1000, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]


class Flux1(Family):
    name = "flux1"
    prompt_outputs = ("prompt_embeds", "pooled_prompt_embeds")

    def encode(self, prompts, device):
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=device,
                                                    max_sequence_length=self.config.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict(self, model, noisy, timestep, cond, guidance):
        pipe = type(self.pipe)
        b, c, h, w = noisy.shape
        packed = pipe._pack_latents(noisy, b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        g = None
        if _config(model).guidance_embeds:
            g = torch.full((b,), float(guidance if guidance is not None else 1.0), device=noisy.device)
        out = model(hidden_states=packed, timestep=timestep.to(noisy.dtype), guidance=g,
                    pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return pipe._unpack_latents(out, h * self.vae_factor, w * self.vae_factor, self.vae_factor)


class Flux2(Family):
    """FLUX.2 dev and Klein: latents are 2x2-patchified, normalised by the VAE's batch-norm statistics, and kept as
    (B, 4C, H/2, W/2) here; tokens are those pixels in raster order with (t, h, w, l) position ids."""

    name = "flux2"
    prompt_outputs = ("prompt_embeds",)

    def encode(self, prompts, device):
        embeds, _ = self.pipe.encode_prompt(prompts, device=device,
                                            max_sequence_length=self.config.max_sequence_length)
        return {"prompt_embeds": embeds}

    def normalise(self, z):
        vae = self.pipe.vae
        z = type(self.pipe)._patchify_latents(z)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
        return (z - mean) / std

    def seq_len(self, latent_shape) -> int:
        return latent_shape[-2] * latent_shape[-1]

    def predict(self, model, noisy, timestep, cond, guidance):
        pipe = type(self.pipe)
        b, c, h, w = noisy.shape
        tokens = pipe._pack_latents(noisy)
        img_ids = pipe._prepare_latent_ids(noisy).to(noisy.device)
        txt_ids = pipe._prepare_text_ids(cond["prompt_embeds"]).to(noisy.device)
        g = None
        if _config(model).guidance_embeds:
            g = torch.full((b,), float(guidance if guidance is not None else 1.0), device=noisy.device)
        out = model(hidden_states=tokens, timestep=timestep.to(noisy.dtype), guidance=g,
                    encoder_hidden_states=cond["prompt_embeds"], txt_ids=txt_ids, img_ids=img_ids,
                    return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)


FAMILIES = {cls.name: cls for cls in (SD15, SDXL, SD3, Flux1, Flux2)}


def _config(model):
    return getattr(model, "config", None) or model.module.config  # accelerate may wrap it (DDP)


# --- loading ----------------------------------------------------------------------------------------------

def read_model_index(base: str | Path) -> dict:
    path = Path(base) / "model_index.json"
    if not Path(base).is_dir():
        raise TrainingError(f"{base}: not a folder.",
                            hint="--base takes a diffusers pipeline folder (with model_index.json).")
    if not path.is_file():
        raise TrainingError(f"{base}: no model_index.json: not a diffusers pipeline folder.",
                            hint="Save the pipeline with save_pretrained, or download the full repository.")
    return json.loads(path.read_text())


def architecture_of(base: str | Path) -> str:
    cls = read_model_index(base).get("_class_name", "?")
    if cls not in PIPELINES:
        raise TrainingError(f"{base}: {cls} bases cannot be trained.",
                            hint=f"Trainable pipelines: {', '.join(sorted(PIPELINES))}.")
    return PIPELINES[cls]


def scheduler_of(base: str | Path) -> tuple[str, dict]:
    index = read_model_index(base)
    cls = (index.get("scheduler") or [None, "?"])[1]
    path = Path(base) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return cls, config


def base_id(base: str | Path) -> str:
    """A short digest of what the cached latents and embeddings depend on: the base's configs."""
    h = hashlib.sha256(str(Path(base).resolve()).encode())
    for rel in sorted(Path(base).glob("*/config.json")):
        h.update(rel.read_bytes())
    return h.hexdigest()[:16]


def make_objective(cfg, base: str | Path) -> Objective:
    """The base's objective (refusing another), with the sampling and shift of its own scheduler."""
    cls, sched = scheduler_of(base)
    kind = check_objective(cfg.objective, base_objective(cls, sched), base=str(base), scheduler_class=cls)
    if kind == "flow":
        dynamic = sched.get("use_dynamic_shifting", False) and cfg.shift is None
        res = {k: sched.get(k, v) for k, v in RESOLUTION_SHIFT.items()} if dynamic else None
        shift = cfg.shift if cfg.shift is not None else float(sched.get("shift", 1.0))
        return Objective(kind, sampling=cfg.timestep_sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                         shift=None if dynamic else shift, resolution_shift=res)
    if cfg.min_snr_gamma is not None and cfg.min_snr_gamma <= 0:
        raise TrainingError("min_snr_gamma must be positive.", hint="5 is the usual value.")
    return Objective(kind, alphas_cumprod=alphas_cumprod(sched), min_snr_gamma=cfg.min_snr_gamma)


def load_base(cfg, arch: str, dtype: torch.dtype) -> Family:
    """Load the pipeline folder (and a single-file denoiser in place of the folder's, when given)."""
    from diffusers import DiffusionPipeline

    try:
        with quiet():
            pipe = DiffusionPipeline.from_pretrained(cfg.base, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{cfg.base}: cannot load the pipeline ({exc}).") from exc
    pipe.set_progress_bar_config(disable=True)
    family = FAMILIES[arch](pipe, cfg)
    if cfg.denoiser_file:
        setattr(pipe, family.denoiser, _single_file(cfg, family, dtype))
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", family.denoiser):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)  # text encoders and VAE stay frozen; the LoRA adds the only trainables
    return family


@contextlib.contextmanager
def quiet():
    """diffusers' and transformers' loading bars and info messages off (the CLI owns the terminal), then restored."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _single_file(cfg, family: Family, dtype):
    """A transformer/UNet from one checkpoint file, placed by diffusers' single-file converters with the base
    folder's config (no download)."""
    current = getattr(family.pipe, family.denoiser)
    try:
        return type(current).from_single_file(cfg.denoiser_file, config=cfg.base, subfolder=family.denoiser,
                                              torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds; all mean "cannot place it"
        raise TrainingError(f"{cfg.denoiser_file}: cannot load it as the {family.denoiser} of {cfg.base} ({exc}).",
                            hint="Pass a checkpoint of the same architecture and size as the base.") from exc
