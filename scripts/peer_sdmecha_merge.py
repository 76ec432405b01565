"""The sd-mecha peer for bench_merge.py: sd-mecha's own merge of a kohya LoRA into an SDXL single-file checkpoint.

    .venv/bin/python scripts/peer_sdmecha_merge.py BASE LORA RATIO OUT [--merge-dtype float32|float64] [--threads N]
    .venv/bin/python scripts/peer_sdmecha_merge.py BASE LORA RATIO OUT --compare LORABOX_OUT

What a user of sd-mecha 1.1.8 writes (see the comment in ``merge`` for the one step spelled differently): the base as an ``sdxl-sgm`` model, the LoRA as an ``sdxl-kohya_kohya_lora``
model (kohya keys flattened from SGM names: ``lora_unet_input_blocks_4_1_proj_in.lora_down.weight``) converted to
``sdxl-sgm`` (a "delta": ``up @ down * alpha / rank`` per weight, in the merge dtype), then
``add_difference(base, delta, alpha=RATIO)`` (``base + RATIO * delta``, the base wherever the LoRA has no key),
streamed to OUT in fp16 with ``merge_dtype`` float32 (sd-mecha's default) or float64. The base holds the UNet only:
sd-mecha's ``sdxl-sgm`` config also lists CLIP-L, CLIP-G and the VAE, and with ``strict_mandatory_keys=False`` (its
default, passed explicitly) it merges the keys the file has and leaves the others out.

``--compare LORABOX_OUT`` then reads OUT and lorabox's merge of the same inputs and prints, over every tensor the two
share, the largest absolute difference, how many elements are bit-identical, and the keys only one side has.
sd-mecha is used by this script only; it is not a lorabox dependency.
"""
from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def merge(base: str, lora: str, ratio: float, out: str, merge_dtype: torch.dtype, threads: int | None,
          ratio_tensor: bool = False) -> None:
    import sd_mecha
    from sd_mecha.extensions import merge_methods

    model = sd_mecha.model(base, "sdxl-sgm")
    delta = sd_mecha.convert(sd_mecha.model(lora, "sdxl-kohya_kohya_lora"), "sdxl-sgm")
    # sd_mecha.add_difference (the wrapper) compares merge spaces before the graph is solved and fails in 1.1.8
    # ("'NoneType' object has no attribute 'identifier'") when its second input is a conversion; the merge method
    # it wraps, plus the same fallback to the base (`| model`), is the recipe it would build.
    # A Python float ratio reaches the merge method as a float32 tensor whatever merge_dtype is (merging.py
    # cast_node_value); --ratio-tensor passes it as a merge_dtype tensor, which sd-mecha casts like a model input.
    alpha = torch.tensor(ratio, dtype=merge_dtype) if ratio_tensor else ratio
    recipe = merge_methods.resolve("add_difference")(model, delta, alpha=alpha) | model
    sd_mecha.merge(recipe, merge_dtype=merge_dtype, output_dtype=torch.float16, threads=threads,
                   strict_mandatory_keys=False, output=out)


def compare(peer_out: str, lorabox_out: str) -> dict:
    """Elementwise agreement of a peer's checkpoint (sd-mecha's, diffusers', PEFT's) with lorabox's over their common
    keys (read one tensor at a time)."""
    from safetensors import safe_open

    with safe_open(peer_out, "pt") as a, safe_open(lorabox_out, "pt") as b:
        ka, kb = set(a.keys()), set(b.keys())
        worst, same, total, dtypes = 0.0, 0, 0, set()
        for key in sorted(ka & kb):
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.shape != y.shape:
                raise SystemExit(f"{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            dtypes.add((str(x.dtype), str(y.dtype)))
            same += int((x.view(torch.int16) == y.view(torch.int16)).sum()) if x.dtype == y.dtype == torch.float16 \
                else int((x == y).sum())
            worst = max(worst, float((x.double() - y.double()).abs().max()))
            total += x.numel()
    return {"common": len(ka & kb), "only_peer": sorted(ka - kb), "only_lorabox": sorted(kb - ka),
            "max_abs_diff": worst, "identical": same, "elements": total, "dtypes": sorted(dtypes)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("lora")
    ap.add_argument("ratio", type=float)
    ap.add_argument("out")
    ap.add_argument("--merge-dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=None, help="sd-mecha's worker threads (default: its own choice)")
    ap.add_argument("--ratio-tensor", action="store_true",
                    help="pass RATIO as a merge-dtype tensor instead of a Python float (sd-mecha rounds those to float32)")
    ap.add_argument("--compare", metavar="LORABOX_OUT", help="compare OUT with lorabox's merge, after merging")
    args = ap.parse_args()
    merge(args.base, args.lora, args.ratio, args.out, DTYPES[args.merge_dtype], args.threads, args.ratio_tensor)
    if args.compare:
        r = compare(args.out, args.compare)
        how = args.merge_dtype + (", ratio tensor" if args.ratio_tensor else "")
        print(f"sd-mecha ({how}) vs lorabox: {r['common']} common tensors, {r['elements']} elements, "
              f"bit-identical {r['identical'] / max(1, r['elements']):.6f} ({r['elements'] - r['identical']} differ), "
              f"max abs diff {r['max_abs_diff']:.3g}; dtypes {r['dtypes']}; only in sd-mecha {r['only_peer'][:5]} "
              f"({len(r['only_peer'])}), only in lorabox {r['only_lorabox'][:5]} ({len(r['only_lorabox'])})")


if __name__ == "__main__":
    main()
