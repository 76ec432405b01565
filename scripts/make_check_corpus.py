#!/usr/bin/env python
"""A corpus of broken and clean LoRAs for `lorabox check`, each with the finding (id, grade) it must raise.

    .venv/bin/python scripts/make_check_corpus.py OUT_DIR        # writes the files and OUT_DIR/expected.json

or from a test: `make_corpus(tmp_path)` returns the cases. Clean files are the fixtures (written by diffusers'
and PEFT's own code paths, scripts/make_fixtures.py) and their conversions by lorabox's writers to every dialect;
FLUX.2 Klein and Wan files follow key_maps/flux2.toml's and key_maps/wan.toml's widths. Every broken file is one of
those with one thing broken. Bases are header-accurate checkpoints from the key-map layouts; the large ones are
sparse files (the tensor bytes are holes: check reads only their headers). No torch is needed.
"""
from __future__ import annotations

import json
import pickle
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lorabox.conversion import convert, load_lora  # noqa: E402
from lorabox.io.safetensors import read_tensors, write_tensors  # noqa: E402
from lorabox.keymap import load_architecture  # noqa: E402
from lorabox.merge.plan import base_slots  # noqa: E402
from lorabox.quant.fp8 import round_fp8  # noqa: E402
from lorabox.tensor import Tensor, storage_dtype  # noqa: E402

FIXTURES = REPO / "fixtures"
CLEAN_SOURCES = {"sd15": "sd15_peft", "sdxl": "sdxl_kohya_sgm", "flux1": "flux1_kohya_bfl", "flux2": "flux2_peft",
                 "sd3": "sd3_peft"}
DIALECTS = ("kohya", "comfyui", "diffusers")


@dataclass
class Case:
    name: str
    file: str
    expect: list[tuple[str, str]]  # (finding id, grade) that must be among the findings
    exit_code: int
    target: str | None = None
    base: str | None = None
    clean: bool = False  # no error at all may be found
    keys: dict[str, list[str]] = field(default_factory=dict)  # finding id -> exactly the keys it must name


def _write(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    write_tensors(path, tensors, metadata or {}, durable=False)
    return str(path)


def _spelled(source: str, dialect: str):
    res = convert(load_lora(FIXTURES / f"{source}.safetensors"), dialect)
    return dict(res.tensors), dict(res.metadata)


def _first(sd: dict[str, Tensor], suffix: str) -> str:
    return next(k for k in sorted(sd) if k.endswith(suffix))


def _writable(t: Tensor) -> Tensor:
    return Tensor(np.array(t.array, order="C"), t.dtype)


def write_sparse(path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
    """A safetensors file with exact header entries and zero tensor bytes left as holes (no disk is used)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        n = int(np.prod(shape)) * storage_dtype(dtype).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return str(path)


# --- FLUX.2 Klein (widths from key_maps/flux2.toml's variants) ----------------------------------------------

def _klein_modules(variant: str) -> list[tuple[str, int, int]]:
    """(canonical module, out rows, in columns) of a few modules that tell the variant apart."""
    dims = load_architecture("flux2").unet.table.variants[variant].dims
    h = dims["hidden"]
    last_double, last_single = (4, 19) if variant == "flux2_klein_4b" else (7, 23)
    return [(f"double_blocks.{last_double}.img_attn.proj", h, h), (f"single_blocks.{last_single}.linear1", 9 * h, h),
            ("double_stream_modulation_img.lin", 6 * h, h), ("single_stream_modulation.lin", 3 * h, h)]


def _kohya_rank2(modules: list[tuple[str, int, int]], seed: int) -> dict[str, Tensor]:
    """A rank-2 kohya LoRA (`lora_unet_` + flattened name, bf16, alpha 2) on (module, rows, cols) weights."""
    rng = np.random.default_rng(seed)
    out = {}
    for module, rows, cols in modules:
        stem = "lora_unet_" + module.replace(".", "_")
        out[stem + ".lora_down.weight"] = Tensor.from_values(rng.standard_normal((2, cols)) * 0.01, "BF16")
        out[stem + ".lora_up.weight"] = Tensor.from_values(rng.standard_normal((rows, 2)) * 0.01, "BF16")
        out[stem + ".alpha"] = Tensor.scalar(2.0)
    return out


def klein_lora(variant: str, seed: int) -> dict[str, Tensor]:
    return _kohya_rank2(_klein_modules(variant), seed)


def klein_base(path: Path, variant: str) -> str:
    return write_sparse(path, [(m + ".weight", "BF16", (rows, cols)) for m, rows, cols in _klein_modules(variant)])


# --- Wan 2.1 / 2.2 (widths from key_maps/wan.toml's variants) -----------------------------------------------

def _wan_modules(variant: str) -> list[tuple[str, tuple[int, ...]]]:
    """(canonical module, weight shape) of the last block's attention and FFN (what musubi-tuner trains), whose widths
    tell 1.3B (1536) from 5B (3072) from 14B (5120); both small sizes have 30 blocks."""
    v = load_architecture("wan").unet.table.variants[variant]
    h, ffn = v.dims["hidden"], v.dims["ffn"]
    last = max(int(m.split(".")[1]) for m in v.modules if m.startswith("blocks."))
    return [(f"blocks.{last}.self_attn.q", (h, h)), (f"blocks.{last}.cross_attn.o", (h, h)),
            (f"blocks.{last}.ffn.0", (ffn, h)), (f"blocks.{last}.ffn.2", (h, ffn))]


def wan_lora(variant: str, seed: int) -> dict[str, Tensor]:
    """A rank-2 LoRA in musubi-tuner's spelling (`lora_unet_blocks_29_self_attn_q`, bf16, alpha tensors)."""
    return _kohya_rank2([(m, rows, cols) for m, (rows, cols) in _wan_modules(variant)], seed)


def wan_base(path: Path, variant: str) -> str:
    """A Wan-AI release-layout checkpoint header: the LoRA's modules and the Conv3d patch embedding."""
    dims = load_architecture("wan").unet.table.variants[variant].dims
    entries = [(m + ".weight", "BF16", shape) for m, shape in _wan_modules(variant)]
    entries.append(("patch_embedding.weight", "BF16", (dims["hidden"], dims["in_channels"], 1, 2, 2)))
    return write_sparse(path, entries)


def table_base(path: Path, arch: str, layout: str) -> str:
    """Every weight of a layout at a token shape: enough for detect_base and for aiming adapters."""
    slots = base_slots(load_architecture(arch), layout)
    return write_sparse(path, [(k, "F16", (4, 4) if k.endswith(".weight") else (4,)) for k in slots])


# --- the corpus ---------------------------------------------------------------------------------------------

def make_corpus(dest: str | Path) -> list[Case]:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name, tensors, expect, exit_code, metadata=None, **kw):
        cases.append(Case(name, _write(dest / f"{name}.safetensors", tensors, metadata), expect, exit_code, **kw))

    # clean: the fixtures as written by diffusers/PEFT, and lorabox's writers in every dialect
    for fixture in sorted(FIXTURES.glob("*.safetensors")):
        cases.append(Case(f"clean_{fixture.stem}", str(fixture), [("arch.detected", "info")], 0, clean=True))
    for arch, source in CLEAN_SOURCES.items():
        for dialect in DIALECTS:
            sd, meta = _spelled(source, dialect)
            add(f"clean_{arch}_{dialect}", sd, [("arch.detected", "info")], 0, meta, clean=True)
    for variant, seed in (("flux2_klein_4b", 4), ("flux2_klein_9b", 9)):
        add(f"clean_{variant}", klein_lora(variant, seed), [("arch.detected", "info")], 0, clean=True)
    add("clean_wan21_t2v_1_3b", wan_lora("wan21_t2v_1_3b", 13), [("arch.detected", "info")], 0, clean=True)

    sd15, meta15 = _spelled("sd15_peft", "kohya")
    flux, _ = _spelled("flux1_kohya_bfl", "kohya")

    sd = dict(sd15)
    key = _first(sd, ".lora_up.weight")
    t = _writable(sd[key])
    t.array.reshape(-1)[0] = np.nan
    sd[key] = t
    add("nan", sd, [("tensors.nonfinite", "error")], 1, keys={"tensors.nonfinite": [key]})

    sd = {k: (Tensor.zeros(t.shape, t.dtype) if k.endswith(".lora_up.weight") else t) for k, t in flux.items()}
    add("zero_up_all", sd, [("tensors.all_zero", "error")], 1)
    sd = dict(flux)
    key = _first(sd, ".lora_up.weight")
    sd[key] = Tensor.zeros(sd[key].shape, sd[key].dtype)
    add("zero_up_one", sd, [("tensors.zero_up", "warning")], 0, keys={"tensors.zero_up": [key]})

    sd = dict(sd15)
    key = _first(sd, ".lora_down.weight")
    sd[key] = sd[key][:2].copy()  # rank 4 -> 2 on down only
    up = key.replace(".lora_down.", ".lora_up.")
    add("rank_mismatch", sd, [("pairs.rank_mismatch", "error")], 1, keys={"pairs.rank_mismatch": sorted([key, up])})

    sd = dict(sd15)
    key = _first(sd, ".lora_up.weight")
    del sd[key]
    add("unpaired", sd, [("pairs.unpaired", "error")], 1,
        keys={"pairs.unpaired": [key.replace(".lora_up.", ".lora_down.")]})

    sd = {k: t for k, t in sd15.items() if not k.endswith(".alpha")}
    add("missing_alpha", sd, [("alpha.missing", "warning")], 0,
        keys={"alpha.missing": sorted(k for k in sd if k.endswith(".lora_down.weight"))})

    sd = dict(sd15)
    key = _first(sd, ".alpha")
    sd[key] = Tensor.scalar(0.0)
    add("alpha_zero", sd, [("alpha.zero", "error")], 1, keys={"alpha.zero": [key]})

    comfy, _ = _spelled("sd15_peft", "comfyui")
    sd = _mix(sd15, comfy, "sd15")
    add("mixed_prefixes", sd, [("dialect.mixed", "warning")], 0)

    sd = {k: (Tensor(round_fp8(t.values32(), "F8_E4M3"), "F8_E4M3") if k.endswith(".weight") else t)
          for k, t in flux.items()}
    add("fp8", sd, [("dtype.fp8", "warning")], 0)

    sd = dict(sd15)
    sd["lora_unet_not_a_module.lora_down.weight"] = sd[_first(sd, ".lora_down.weight")]
    add("unknown_keys", sd, [("keys.unknown", "error")], 1,
        keys={"keys.unknown": ["lora_unet_not_a_module.lora_down.weight"]})

    add("metadata_says_sdxl", sd15, [("arch.metadata_mismatch", "error")], 1, {"ss_base_model_version": "sdxl_base_v1-0"})

    private = {"ss_dataset_dirs": json.dumps({"/home/alice/datasets/her_cat": {"n_repeats": 10, "img_count": 20}}),
               "ss_sd_model_name": "/home/alice/models/v1-5-pruned.safetensors"}
    add("private_metadata", sd15, [("meta.private", "warning")], 0, private)
    add("private_metadata_civitai", sd15, [("meta.private", "error")], 1, private, target="civitai")

    add("flux_kohya_for_diffusers", flux, [("coverage.diffusers_drops", "error")], 1, target="diffusers")
    sd, meta = _spelled("sd15_peft", "comfyui")
    add("sd15_comfyui_for_diffusers", sd, [("coverage.diffusers_refuses", "error")], 1, meta, target="diffusers")
    cases.append(Case("peft_alpha_for_comfyui", str(FIXTURES / "sd15_peft.safetensors"),
                      [("alpha.metadata_only", "error"), ("coverage.comfyui_drops", "error")], 1, target="comfyui"))

    sd = dict(sd15)
    stem = _first(sd, ".lora_down.weight")[: -len(".lora_down.weight")].replace("_attn1_to_q", "_attn1_to_k")
    sd = {k: t for k, t in sd.items() if not k.startswith(stem + ".")}
    sd[stem + ".diff"] = Tensor.zeros((768, 768), "F32")  # a full-weight delta: 2.25 MiB, no rank
    add("full_diff", sd, [("size.extra_tensors", "warning")], 0, keys={"size.extra_tensors": [stem + ".diff"]})
    add("trailing_bytes", sd15, [("container.trailing_bytes", "warning")], 0)
    with open(dest / "trailing_bytes.safetensors", "ab") as f:
        f.write(b"\0" * 4096)

    cases.append(Case("peft_for_kohya", str(FIXTURES / "sd15_peft.safetensors"), [("coverage.kohya_drops", "error")], 1,
                      target="kohya"))
    cases.append(Case("kohya_for_kohya", str(dest / "clean_sd15_kohya.safetensors"), [("arch.detected", "info")], 0,
                      target="kohya", clean=True))

    # against a base
    sdxl_base = table_base(dest / "base_sdxl_single_file.safetensors", "sdxl", "single_file")
    sd15_base = table_base(dest / "base_sd15_single_file.safetensors", "sd15", "single_file")
    add("sd15_on_sdxl_base", sd15, [("arch.base_mismatch", "error")], 1, base=sdxl_base)
    add("sd15_on_sd15_base", sd15, [("arch.detected", "info")], 0, base=sd15_base, clean=True)
    klein9_base = klein_base(dest / "base_flux2_klein_9b.safetensors", "flux2_klein_9b")
    add("klein4b_on_klein9b_base", klein_lora("flux2_klein_4b", 4), [("arch.variant_mismatch", "error")], 1,
        base=klein9_base)
    add("klein9b_on_klein9b_base", klein_lora("flux2_klein_9b", 9), [("arch.detected", "info")], 0, base=klein9_base,
        clean=True)
    wan5b_base = wan_base(dest / "base_wan22_ti2v_5b.safetensors", "wan22_ti2v_5b")
    add("wan21_1_3b_on_wan22_5b_base", wan_lora("wan21_t2v_1_3b", 13), [("arch.variant_mismatch", "error")], 1,
        base=wan5b_base)
    add("wan22_5b_on_wan22_5b_base", wan_lora("wan22_ti2v_5b", 5), [("arch.detected", "info")], 0, base=wan5b_base,
        clean=True)
    sd = klein_lora("flux2_klein_9b", 9)
    stem = "lora_unet_double_blocks_0_img_attn_proj"  # a 9B module the (partial) base file does not hold
    sd.update({stem + ".lora_down.weight": sd["lora_unet_double_blocks_7_img_attn_proj.lora_down.weight"],
               stem + ".lora_up.weight": sd["lora_unet_double_blocks_7_img_attn_proj.lora_up.weight"],
               stem + ".alpha": Tensor.scalar(2.0)})
    add("klein9b_module_missing_in_base", sd, [("coverage.base_missing", "error")], 1, base=klein9_base,
        keys={"coverage.base_missing": ["unet:double_blocks.0.img_attn.proj"]})

    # unusable input (exit 2)
    path = dest / "pickled.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"lora_unet_x.lora_down.weight": [0.0]}}, f, protocol=2)
    cases.append(Case("pickle", str(path), [("container.pickle", "error")], 2))
    src = (dest / "clean_sd15_kohya.safetensors").read_bytes()
    (dest / "truncated_header.safetensors").write_bytes(src[:4096])
    cases.append(Case("truncated_header", str(dest / "truncated_header.safetensors"), [("container.truncated", "error")], 2))
    (dest / "corrupt_header.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 16)
    cases.append(Case("corrupt_header", str(dest / "corrupt_header.safetensors"), [("container.header", "error")], 2))
    add("empty", {}, [("container.empty", "error")], 2)
    add("not_a_lora", {"model.diffusion_model.out.2.weight": Tensor.zeros((4, 4), "F16")}, [("container.not_lora", "error")], 2)
    return cases


def _mix(a: dict[str, Tensor], b: dict[str, Tensor], arch: str) -> dict[str, Tensor]:
    """Every other module from `a`, the rest from `b`: two dialects in one file, each adapter spelled once."""
    from lorabox.dialects import parse_key

    spec = load_architecture(arch)

    def module(key):
        p = parse_key(key, spec)
        return p.component, p.hit.module.canonical

    from_a = set(sorted({module(k) for k in a})[::2])
    return {**{k: t for k, t in a.items() if module(k) in from_a}, **{k: t for k, t in b.items() if module(k) not in from_a}}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1])
        return 2
    cases = make_corpus(argv[0])
    (Path(argv[0]) / "expected.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    print(f"{len(cases)} cases in {argv[0]} ({sum(c.clean for c in cases)} clean)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
