#!/usr/bin/env python
"""Reference measurement: what a plain peft LoRA learns on the tiny base (fixtures/tiny_flux) in a few seconds.

    .venv/bin/python scripts/probe_tiny_lora.py [--steps 400] [--lr 3e-3] [--rank 4]

Not the trainer: a minimal loop with diffusers' own pieces (FluxPipeline.encode_prompt, _pack_latents, peft
``add_adapter`` on diffusers' Flux LoRA targets, Flux's rectified-flow loss, logit-normal s, guidance 1.0, batch 4) on
fixtures/tiny_dataset with the trigger prepended, so `lorabox train --minimal`'s numbers have a peer to compare with.
Prints (and with --json writes) before/after:

* magenta_fraction (tests/oracles/tiny_world.py) of samples at seed 0 for trigger + data set captions, the same
  captions without the trigger, and unrelated prompts with explicit colours;
* the held-out loss on fixtures/tiny_dataset_val at fixed s = 0.1, 0.3, 0.5, 0.7, 0.9 with fixed noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402

from tests.oracles import tiny_world as world  # noqa: E402

FIXTURES = REPO / "fixtures"
# diffusers' train_dreambooth_lora_flux.py default targets (FIELD_NOTES section 4)
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]  # fmt: skip
QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
UNRELATED = [  # (shape, colour, background): prompts with explicit colours, no trigger
    ("circle", "red", "blue"), ("square", "yellow", "black"),
    ("triangle", "white", "green"), ("circle", "cyan", "orange"),
]  # fmt: skip
BATCH = 4


def read_folder(folder: Path):
    paths = sorted(folder.glob("*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in paths])
    return images, [p.with_suffix(".txt").read_text().strip() for p in paths]


class Probe:
    def __init__(self, facts: dict):
        self.facts = facts
        self.pipe = FluxPipeline.from_pretrained(FIXTURES / "tiny_flux", local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)

    def latents(self, images: np.ndarray) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2)) * 2 - 1).latent_dist.mode()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    def text(self, captions: list[str]):
        with torch.no_grad():
            return self.pipe.encode_prompt(captions, None, max_sequence_length=self.facts["max_sequence_length"])

    def forward(self, x0, noise, sigma, embeds, pooled, text_ids):
        n, c, h, w = x0.shape
        s = sigma.view(-1, 1, 1, 1)
        prediction = self.pipe.transformer(
            hidden_states=FluxPipeline._pack_latents((1 - s) * x0 + s * noise, n, c, h, w),
            encoder_hidden_states=embeds, pooled_projections=pooled, timestep=sigma, guidance=torch.ones(n),
            txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False,
        )[0]  # fmt: skip
        return torch.nn.functional.mse_loss(prediction, FluxPipeline._pack_latents(noise - x0, n, c, h, w))

    def sample(self, prompts: list[str]) -> np.ndarray:
        f = self.facts
        return self.pipe(
            prompt=prompts, height=f["resolution"], width=f["resolution"], num_inference_steps=f["num_inference_steps"],
            guidance_scale=f["guidance_scale"], max_sequence_length=f["max_sequence_length"], output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip

    def measure(self, captions: list[str], validation) -> dict:
        trigger = self.facts["trigger"]
        groups = {
            "trigger": [f"{trigger} {c}" for c in captions],
            "no_trigger": captions,
            "unrelated": [world.caption(*u) for u in UNRELATED],
        }
        out = {f"magenta_fraction_{k}": world.magenta_fraction(self.sample(v)) for k, v in groups.items()}
        with torch.no_grad():
            out["validation_loss"] = [
                self.forward(validation[0], validation[1], torch.full((len(validation[0]),), q), *validation[2]).item()
                for q in QUANTILES
            ]
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    facts = json.loads((FIXTURES / "tiny_flux" / "lorabox_tiny.json").read_text())
    probe = Probe(facts)
    trigger = facts["trigger"]

    images, captions = read_folder(FIXTURES / "tiny_dataset")
    val_images, val_captions = read_folder(FIXTURES / "tiny_dataset_val")
    z = probe.latents(images)
    embeds, pooled, text_ids = probe.text([f"{trigger} {c}" for c in captions])
    zv = probe.latents(val_images)
    validation = (zv, torch.randn(zv.shape, generator=torch.Generator().manual_seed(9)),
                  probe.text([f"{trigger} {c}" for c in val_captions]))  # fmt: skip

    before = probe.measure(captions[:8], validation)
    torch.manual_seed(0)
    transformer = probe.pipe.transformer
    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="gaussian")
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    generator = torch.Generator().manual_seed(1)
    started = time.time()
    transformer.train()
    for _ in range(args.steps):
        idx = torch.randint(len(z), (BATCH,), generator=generator)
        noise = torch.randn(z[idx].shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(BATCH, generator=generator))
        loss = probe.forward(z[idx], noise, sigma, embeds[idx], pooled[idx], text_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.time() - started
    transformer.eval()
    after = probe.measure(captions[:8], validation)

    result = {"steps": args.steps, "lr": args.lr, "rank": args.rank, "lora_params": sum(p.numel() for p in params),
              "train_seconds": round(seconds, 1), "before": before, "after": after}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
