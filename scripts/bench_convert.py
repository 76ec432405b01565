"""Benchmark `lorabox convert` on a full-size FLUX.1 rank-32 kohya LoRA with every layer (~1,000 keys).

Shapes come from diffusers' FluxTransformer2DModel built on the meta device; the LoRA is random bf16.
Reports wall time of the CLI minus interpreter start, and, in the same process, diffusers' own
kohya->PEFT conversion (`FluxPipeline.lora_state_dict`) of the same file as the peer figure.

    .venv/bin/python scripts/bench_convert.py [--rank 32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorabox.io.safetensors import write_tensors  # noqa: E402
from lorabox.keymap import load_architecture  # noqa: E402
from lorabox.tensor import Tensor  # noqa: E402

FLUX1_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def flux_shapes() -> dict[str, tuple[int, int]]:
    """canonical module -> (out, in) at full size, from diffusers' model on meta."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX1_DEV)
    sd = {k[:-len(".weight")]: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith(".weight")}
    out = {}
    for m in load_architecture("flux1").unet.table.modules.values():
        shapes = [sd[d] for d in m.diffusers]
        out[m.canonical] = (sum(s[0] for s in shapes), shapes[0][1])
    return out


def make_lora(path: Path, rank: int) -> int:
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (n_out, n_in) in flux_shapes().items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[key + ".lora_down.weight"] = Tensor.from_values(rng.standard_normal((rank, n_in), np.float32) * 0.01, "BF16")
        tensors[key + ".lora_up.weight"] = Tensor.from_values(rng.standard_normal((n_out, rank), np.float32) * 0.01, "BF16")
        tensors[key + ".alpha"] = Tensor.scalar(rank / 2)
    write_tensors(path, tensors, {"ss_network_dim": str(rank)})
    return len(tensors)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "flux_kohya.safetensors"
        keys = make_lora(src, args.rank)
        print(f"FLUX.1 rank {args.rank} kohya LoRA: {keys} keys, {src.stat().st_size / 1e6:.0f} MB")
        start = statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(args.repeat))
        print(f"interpreter start: {start:.3f} s")
        rows = []
        for to in ("diffusers", "comfyui", "kohya"):
            out = Path(tmp) / f"out_{to}.safetensors"
            cmd = [sys.executable, "-m", "lorabox", "convert", str(src), "--to", to, "-o", str(out), "--overwrite"]
            t = statistics.median(timed(cmd) for _ in range(args.repeat))
            rows.append((to, t - start))
            print(f"lorabox convert --to {to:9s}: {t - start:.3f} s beyond interpreter start")
        t = timed([sys.executable, "-m", "lorabox", "inspect", str(src)])
        print(f"lorabox inspect               : {t - start:.3f} s beyond interpreter start")
        # the peer: diffusers' own kohya -> PEFT conversion of the same file, same process
        t0 = time.perf_counter()
        import diffusers  # noqa: F401
        from safetensors.torch import load_file

        t_import = time.perf_counter() - t0
        from diffusers import FluxPipeline

        t0 = time.perf_counter()
        FluxPipeline.lora_state_dict(load_file(str(src)))
        t_peer = time.perf_counter() - t0
        print(f"diffusers FluxPipeline.lora_state_dict (kohya -> PEFT, in memory, no write): {t_peer:.3f} s "
              f"(+ {t_import:.1f} s to import diffusers)")
        print(f"ratio lorabox (--to diffusers, incl. read+write) / diffusers (convert only): {rows[0][1] / t_peer:.2f}")


if __name__ == "__main__":
    main()
