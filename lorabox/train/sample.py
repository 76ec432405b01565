"""Sample images (fixed seed, with and without the adapter, at the deployment steps and guidance) and the loss curve.

The pipeline is called with cached prompt embeddings, so the text encoders need not stay in memory. The curve is
drawn with Pillow (which diffusers already needs): no plotting dependency.
"""
from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def sample_images(family, model, prompts: list[str], embeds: dict[str, dict], uncond: dict, *, cfg,
                  size: tuple[int, int], folder: Path, device, dtype) -> list[dict]:
    """For each prompt, one image without and one with the adapter, at the same seed. Returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe = family.pipe
    out = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        for label, enabled in (("base", False), ("lora", True)):
            model.enable_adapters() if enabled else model.disable_adapters()
            kwargs = family.sample_kwargs(_to(embeds[prompt], device, dtype), _to(uncond, device, dtype))
            # autocast as in training: float32 LoRA layers would otherwise promote the latents the VAE decodes
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                image = pipe(**kwargs, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance,
                             width=size[0], height=size[1], output_type="pil",
                             generator=torch.Generator("cpu").manual_seed(cfg.sample_seed)).images[0]
            path = folder / f"{i:02d}-{label}.png"
            image.save(path)
            row[label] = str(path)
        out.append(row)
    model.enable_adapters()
    return out


def _to(d: dict, device, dtype) -> dict:
    """Cached embeddings (float32) as a batch of one in the base's dtype: the pipeline takes its latents' dtype
    from them, and its VAE decodes in the base's dtype."""
    return {k: v.unsqueeze(0).to(device, dtype) for k, v in d.items()}


def loss_curve(losses: list[float], evals: list[tuple[int, float]], path: Path, *, size=(800, 450)) -> None:
    """Training loss (grey), its moving average (blue) and the held-out loss (red dots), log-free linear axes."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 20, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [v for v in losses if v == v] + [v for _, v in evals]
    if not values:
        img.save(path)
        return
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    n = max(len(losses), max((s for s, _ in evals), default=1), 1)

    def xy(step, value):
        return (left + (w - left - right) * step / n, top + (h - top - bottom) * (1 - (value - lo) / (hi - lo)))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        y = xy(0, v)[1]
        draw.text((4, y - 6), f"{v:.4g}", fill="black")
    draw.text((left, h - bottom + 8), "0", fill="black")
    draw.text((w - right - 40, h - bottom + 8), f"{n} steps", fill="black")
    if len(losses) > 1:
        draw.line([xy(i + 1, v) for i, v in enumerate(losses)], fill=(190, 190, 190), width=1)
        k = max(1, len(losses) // 20)  # trailing mean over 5 % of the run
        mean = [sum(losses[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(losses))]
        draw.line([xy(i + 1, v) for i, v in enumerate(mean)], fill=(30, 90, 200), width=2)
    for step, v in evals:
        x, y = xy(step, v)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(210, 40, 40))
    draw.text((left + 8, top + 4), "loss (grey), moving average (blue), held-out (red)", fill="black")
    img.save(path)
