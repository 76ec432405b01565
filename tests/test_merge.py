"""Merge: exact against a float64 reference rounded by torch; both base layouts; errors leave nothing behind."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lorabox.conversion import convert
from lorabox.errors import LoraboxError, OutputError, ShapeMismatch, UnknownArchitecture, UnmappedKeysError
from lorabox.io.safetensors import read_tensors, write_tensors
from lorabox.keymap import load_architecture
from lorabox.merge.engine import merge
from lorabox.tensor import Tensor
from tests.helpers import effective_deltas, rand, random_lora

TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def flux_base(rng, dtype="BF16", n_in=16):
    """A tiny BFL-layout Flux transformer: every canonical module, rows as random_lora makes them, plus a bias
    and a tensor no LoRA targets."""
    base = {}
    for m in load_architecture("flux1").unet.table.modules.values():
        rows = 6 * (sum(m.split) if m.split else 1)
        base[m.canonical + ".weight"] = rand(rng, (rows, n_in), dtype)
        base[m.canonical + ".bias"] = rand(rng, (rows,), dtype)
    base["pe_embedder.freqs"] = rand(rng, (4,), "F32")
    return base


def to_diffusers_layout(base):
    """The same weights in a diffusers folder layout (split rows, swapped adaLN halves)."""
    out = {}
    for m in load_architecture("flux1").unet.table.modules.values():
        for suffix in (".weight", ".bias"):
            t = base[m.canonical + suffix]
            if m.op == "swap_halves":
                n = t.shape[0]
                t = Tensor.concat([t[n // 2:], t[:n // 2]])
            if m.split:
                unit = t.shape[0] // sum(m.split)
                r = 0
                for name, p in zip(m.diffusers, m.split):
                    out[name + suffix] = t[r:r + unit * p].copy()
                    r += unit * p
            else:
                out[m.diffusers[0] + suffix] = t
    return out


def reference(base, loras, dtype):
    """W + sum(ratio * scale * delta) in float64, then torch's rounding to `dtype`."""
    out = {}
    deltas = [(effective_deltas(lora), r) for lora, r in loras]
    for key, t in base.items():
        w = t.values()
        module = key[: -len(".weight")]
        if key.endswith(".weight"):
            for d, r in deltas:
                if ("unet", module) in d:
                    w = w + r * d[("unet", module)]
        out[key] = torch.from_numpy(w).to(TORCH.get(dtype, torch.float32)) if t.dtype in TORCH else None
    return out


def write_lora(path, lora, dialect):
    res = convert(lora, dialect)
    write_tensors(path, res.tensors, res.metadata)
    return path


def as_torch(t):
    a = np.array(t.array)
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if t.dtype == "BF16" else torch.from_numpy(a)


@pytest.mark.parametrize("dtype", ["keep", "bf16", "fp16", "fp32"])
def test_merge_equals_float64_reference_rounded_once(tmp_path, dtype):
    rng = np.random.default_rng(0)
    base = flux_base(rng)
    write_tensors(tmp_path / "base.safetensors", base, {"note": "kept"})
    a = random_lora("flux1", seed=1, every=3, alpha=3.0, text_encoders=False)  # whole qkv/linear1
    b = random_lora("flux1", seed=2, every=2, alpha=4.0, slices=True, text_encoders=False)  # slices, diffusers
    la = write_lora(tmp_path / "a.safetensors", a, "kohya")
    lb = write_lora(tmp_path / "b.safetensors", b, "diffusers")
    report = merge(tmp_path / "base.safetensors", [(la, 0.8), (lb, -0.5)], tmp_path / "out.safetensors", dtype=dtype)
    assert report.merged > 0 and report.architecture == "flux1" and report.layout == "bfl"
    out, meta = read_tensors(tmp_path / "out.safetensors")
    target = {"keep": "BF16", "bf16": "BF16", "fp16": "F16", "fp32": "F32"}[dtype]
    ref = reference(base, [(a, 0.8), (b, -0.5)], target)
    for key, t in out.items():
        if key == "pe_embedder.freqs":  # no LoRA targets it: kept, or only cast
            want = torch.from_numpy(base[key].values()).to(TORCH["F32" if dtype == "keep" else target])
            assert torch.equal(as_torch(t), want)
            continue
        assert t.dtype == target, key
        assert torch.equal(as_torch(t), ref[key]), key
    record = json.loads(meta["lorabox.merge"])
    assert meta["note"] == "kept"
    assert [x["ratio"] for x in record["loras"]] == [0.8, -0.5]
    import hashlib

    assert record["base"]["sha256"] == hashlib.sha256((tmp_path / "base.safetensors").read_bytes()).hexdigest()
    assert record["loras"][0]["sha256"] == hashlib.sha256(la.read_bytes()).hexdigest()


@pytest.mark.parametrize("alpha,ratio", [(2.0, 0.8), (3.0, 0.5), (3.0, 0.7), (4.0, 1.0)])
def test_scale_and_ratio_multiplies_keep_the_reference_value(tmp_path, alpha, ratio):
    """ratio * (scale * up@down): one multiply by their product where either is a power of two (rank 4: alpha 2 is
    scale 0.5), two otherwise; every case equals the reference's two multiplies bit for bit."""
    from lorabox.merge.math import multipliers

    rank = 4
    scale = alpha / rank
    factors = multipliers(scale, ratio)
    assert len(factors) == (0 if scale == ratio == 1 else 1 if 1.0 in (scale, ratio) or 0.5 in (scale, ratio) else 2)
    d = np.random.default_rng(4).standard_normal(1 << 16) * 1e-3
    folded = d.copy()
    for f in factors:
        folded *= f
    assert np.array_equal(folded, (d * scale) * ratio)
    base = flux_base(np.random.default_rng(5))
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", seed=6, every=2, rank=rank, alpha=alpha, text_encoders=False)
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, ratio)], tmp_path / "out.safetensors")
    out, _ = read_tensors(tmp_path / "out.safetensors")
    ref = reference(base, [(lora, ratio)], "BF16")
    assert all(torch.equal(as_torch(out[k]), ref[k]) for k in out if k != "pe_embedder.freqs")


def test_merge_into_a_diffusers_folder_matches_the_bfl_merge(tmp_path):
    """Split rows, whole-on-split, slice-on-split and the swapped adaLN halves all land where the BFL merge puts them."""
    rng = np.random.default_rng(3)
    base = flux_base(rng, "F32")
    folder = tmp_path / "transformer"
    folder.mkdir()
    write_tensors(folder / "diffusion_pytorch_model.safetensors", to_diffusers_layout(base))
    (folder / "config.json").write_text("{}")
    write_tensors(tmp_path / "bfl.safetensors", base)
    a = random_lora("flux1", seed=4, every=1, alpha=2.0, text_encoders=False)
    b = random_lora("flux1", seed=5, every=1, alpha=8.0, slices=True, text_encoders=False)
    loras = [(write_lora(tmp_path / "a.safetensors", a, "comfyui"), 1.0),
             (write_lora(tmp_path / "b.safetensors", b, "diffusers"), 0.7)]
    merge(folder, loras, tmp_path / "merged", dtype="keep")
    merge(tmp_path / "bfl.safetensors", loras, tmp_path / "merged_bfl.safetensors")
    assert (tmp_path / "merged" / "config.json").exists()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    got, _ = read_tensors(tmp_path / "merged" / "diffusion_pytorch_model.safetensors")
    want, _ = read_tensors(tmp_path / "merged_bfl.safetensors")
    expected = to_diffusers_layout({k: v for k, v in want.items() if k != "pe_embedder.freqs"})
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k].bits_equal(expected[k]), k


def test_block_ratio_and_bias_delta(tmp_path):
    rng = np.random.default_rng(6)
    base = flux_base(rng, "F32")
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", seed=7, every=1, alpha=4.0, text_encoders=False)
    ad = lora.adapters[("unet", "single_blocks.3.linear2", None)]
    ad.tensors["diff_b"] = rand(rng, (6,), "F32")
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "o.safetensors",
          block_ratios=[("single_blocks.*", 0.0), ("single_blocks.3.*", 2.0)])
    out, _ = read_tensors(tmp_path / "o.safetensors")
    d = effective_deltas(lora)
    assert out["single_blocks.0.linear1.weight"].bits_equal(base["single_blocks.0.linear1.weight"])  # ratio 0
    assert out["double_blocks.0.img_attn.qkv.weight"].bits_equal(
        Tensor.from_values(base["double_blocks.0.img_attn.qkv.weight"].values() + d[("unet", "double_blocks.0.img_attn.qkv")], "F32"))
    assert out["single_blocks.3.linear2.bias"].bits_equal(  # 0 * 2 = 0: both patterns apply
        base["single_blocks.3.linear2.bias"])


def test_wrong_architecture_unknown_targets_and_drop_unknown(tmp_path):
    rng = np.random.default_rng(8)
    write_tensors(tmp_path / "base.safetensors", flux_base(rng))
    sdxl = write_lora(tmp_path / "sdxl.safetensors", random_lora("sdxl", every=50), "kohya")
    with pytest.raises(UnknownArchitecture, match="is for sdxl, the base is flux1"):
        merge(tmp_path / "base.safetensors", [(sdxl, 1.0)], tmp_path / "o.safetensors")
    with_te = write_lora(tmp_path / "te.safetensors", random_lora("flux1", every=20), "kohya")
    with pytest.raises(UnmappedKeysError, match="land on no weight of this checkpoint"):
        merge(tmp_path / "base.safetensors", [(with_te, 1.0)], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    report = merge(tmp_path / "base.safetensors", [(with_te, 1.0)], tmp_path / "o.safetensors", drop_unknown=True)
    assert report.dropped and all(d.startswith(("clip_l:", "t5xxl:")) for d in report.dropped)


@pytest.mark.parametrize("quant,kind", [(None, "lora"), ("Q8_0", "lora"), (None, "loha")])
def test_a_lora_for_another_model_size_stops_before_writing(tmp_path, quant, kind):
    """Its factors are 16 inputs wide, the base's weights 64: one clear error before anything is written, from the
    library and from the CLI (the torch tiles used to fail inside the product with a RuntimeError)."""
    from lorabox.lora import Adapter

    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(20), n_in=64))
    lora = random_lora("flux1", seed=21, every=3, text_encoders=False)
    if kind == "loha":
        rng = np.random.default_rng(25)
        for key, a in list(lora.adapters.items()):
            rows, n_in = a.tensors["up"].shape[0], a.tensors["down"].shape[1]
            lora.adapters[key] = Adapter(a.component, a.module, None, {
                "hada_w1_a": rand(rng, (rows, 2)), "hada_w1_b": rand(rng, (2, n_in)),
                "hada_w2_a": rand(rng, (rows, 2)), "hada_w2_b": rand(rng, (2, n_in))}, Tensor.scalar(2.0))
    lora = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    with pytest.raises(ShapeMismatch, match=r"delta is \d+ x 16, the base weight .* is \d+ x 64: a LoRA for another"):
        merge(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "o.out", quant=quant)
    proc = subprocess.run([sys.executable, "-m", "lorabox", "merge", str(tmp_path / "base.safetensors"), "--lora",
                           str(lora), "-o", str(tmp_path / "o.out")] + (["--quant", quant] if quant else []),
                          capture_output=True, text=True)
    assert proc.returncode == ShapeMismatch.exit_code and "Traceback" not in proc.stderr and "another size" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]


def test_ratios_that_are_not_finite_numbers_are_refused(tmp_path):
    """float() reads "nan" and "inf": merged at such a ratio, every patched weight would be NaN or infinite."""
    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(22)))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=23, every=5, text_encoders=False), "kohya")
    with pytest.raises(LoraboxError, match="the ratio nan is not a finite number"):
        merge(tmp_path / "base.safetensors", [(lora, float("nan"))], tmp_path / "o.safetensors")
    with pytest.raises(LoraboxError, match="--block-ratio double_blocks.*: the ratio inf is not a finite number"):
        merge(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "o.safetensors",
              block_ratios=[("double_blocks.*", float("inf"))])
    cli = [sys.executable, "-m", "lorabox", "merge", str(tmp_path / "base.safetensors"),
           "-o", str(tmp_path / "o.safetensors")]
    for args in (["--lora", f"{lora}:nan"], ["--lora", str(lora), "--ratio", "inf"],
                 ["--lora", str(lora), "--block-ratio", "single_blocks.*=-inf"]):
        proc = subprocess.run(cli + args, capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, args
        assert "is not a finite number" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]


def test_output_rules_and_no_partial_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    write_tensors(tmp_path / "base.safetensors", flux_base(rng))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", every=5, text_encoders=False), "kohya")
    with pytest.raises(OutputError, match="is \\(inside\\) an input"):
        merge(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "base.safetensors")
    with pytest.raises(OutputError, match="is \\(inside\\) an input"):
        merge(tmp_path / "base.safetensors", [(lora, 1.0)], lora)

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "o.safetensors", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(OutputError, match="GB free"):
        merge(tmp_path / "base.safetensors", [(lora, 1.0)], tmp_path / "o.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]


def test_cli_merge_errors_are_one_line(tmp_path):
    rng = np.random.default_rng(10)
    write_tensors(tmp_path / "base.safetensors", flux_base(rng))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", every=5, text_encoders=False), "kohya")
    cli = [sys.executable, "-m", "lorabox", "merge", str(tmp_path / "base.safetensors")]
    proc = subprocess.run(cli + ["--lora", f"{lora}:abc", "-o", str(tmp_path / "o.safetensors")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "is not a number" in proc.stderr
    proc = subprocess.run(cli + ["--lora", f"{lora}:0.5", "-o", str(tmp_path / "o.safetensors"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["loras"][0]["ratio"] == 0.5 and report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    stages = report["stages"]  # where the merging thread's time went
    assert list(stages) == ["computing", "waiting for reads", "waiting for writes"] and stages["computing"] > 0
    assert 0 < sum(stages.values()) <= report["seconds"]
    if not torch.cuda.is_available():
        proc = subprocess.run(cli + ["--lora", str(lora), "-o", str(tmp_path / "c.safetensors"), "--device", "cuda"],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no CUDA device" in proc.stderr
        assert not (tmp_path / "c.safetensors").exists()
    proc = subprocess.run(cli + ["--lora", str(lora), "-o", str(tmp_path / "s.safetensors"), "--dtype", "bf16",
                                 "--fp8-layout", "legacy"], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs --dtype fp8" in proc.stderr and not (tmp_path / "s.safetensors").exists()


FP8_TORCH = {"F8_E4M3": (torch.float8_e4m3fn, 448.0), "F8_E5M2": (torch.float8_e5m2, 57344.0)}


def _fp8_merge(tmp_path, dtype, rounding, name="out.safetensors"):
    rng = np.random.default_rng(11)
    base = flux_base(rng, "BF16", n_in=64)
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", seed=12, every=2, alpha=4.0, text_encoders=False)
    for a in lora.adapters.values():  # widths to match the base
        a.tensors["down"] = rand(np.random.default_rng(13), (4, 64), "BF16")
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, 0.25)], tmp_path / name, dtype=dtype, rounding=rounding)
    return base, lora, read_tensors(tmp_path / name)[0]


@pytest.mark.parametrize("dtype,target", [("fp8_e4m3fn", "F8_E4M3"), ("fp8_e5m2", "F8_E5M2")])
def test_fp8_nearest_equals_torch_cast(tmp_path, dtype, target):
    base, lora, out = _fp8_merge(tmp_path, dtype, "nearest")
    ref = reference(base, [(lora, 0.25)], "F32")
    tdtype, fmax = FP8_TORCH[target]
    for key, t in out.items():
        if base[key].ndim < 2:  # biases keep bf16
            assert t.dtype == base[key].dtype
            continue
        assert t.dtype == target
        want = ref[key].clamp(-fmax, fmax).to(tdtype).view(torch.uint8).numpy()
        assert np.array_equal(t.array, want), key


def test_fp8_stochastic_is_deterministic_and_unbiased(tmp_path):
    from lorabox.quant.fp8 import decode_fp8

    base, lora, out = _fp8_merge(tmp_path, "fp8_e4m3fn", "stochastic")
    _, _, again = _fp8_merge(tmp_path, "fp8_e4m3fn", "stochastic", "again.safetensors")
    ref = reference(base, [(lora, 0.25)], "F32")
    touched = {f"{m}.weight" for (_, m) in effective_deltas(lora)}
    errors, spacing = [], []
    for key in touched:
        assert out[key].bits_equal(again[key]), key  # same inputs, same bytes
        exact = ref[key].double().numpy()
        got = decode_fp8(out[key].array, "F8_E4M3")
        nearest = torch.from_numpy(exact).float().to(torch.float8_e4m3fn).double().numpy()
        step = np.abs(exact) * 2.0**-3 + 2.0**-9  # at least the local fp8 spacing
        assert (np.abs(got - exact) <= step).all(), key  # one of the two neighbours
        errors.append((got - exact).ravel())
        spacing.append(step.ravel())
        assert not np.array_equal(got, nearest), key  # it really is stochastic
    err, step = np.concatenate(errors), np.concatenate(spacing)
    assert abs(err.mean()) < 6 * (step / 2).std() / np.sqrt(err.size) + 6 * step.mean() / np.sqrt(err.size)


def test_fp8_base_keeps_its_type(tmp_path):
    rng = np.random.default_rng(14)
    base = {k: (Tensor(np.asarray(torch.from_numpy(v.values()).float().to(torch.float8_e4m3fn).view(torch.uint8)),
                       "F8_E4M3") if v.ndim == 2 else v) for k, v in flux_base(rng, "BF16").items()}
    write_tensors(tmp_path / "fp8.safetensors", base)
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", every=4, text_encoders=False), "kohya")
    merge(tmp_path / "fp8.safetensors", [(lora, 1.0)], tmp_path / "o.safetensors", rounding="nearest")
    out, _ = read_tensors(tmp_path / "o.safetensors")
    assert all(out[k].dtype == base[k].dtype for k in base)


def _scaled_base(rng, layout):
    """A tiny Flux in ComfyUI's scaled fp8 (legacy: `scaled_fp8` marker + `.scale_weight`; comfy_quant:
    `.comfy_quant` + `.weight_scale`), made with lorabox.quant.fp8 (its layouts are checked against ComfyUI)."""
    from lorabox.quant.fp8 import quantize_scaled, scaled_fp8_marker, scaled_layer_tensors

    out = {}
    for key, t in flux_base(rng, "BF16").items():
        if t.ndim == 2:
            bits, scale = quantize_scaled(t.values32(), "F8_E4M3")
            out.update(scaled_layer_tensors(key[: -len(".weight")], bits, "F8_E4M3", scale, layout=layout))
        else:
            out[key] = t
    if layout == "legacy":
        out["scaled_fp8"] = scaled_fp8_marker("F8_E4M3")
    return out


@pytest.mark.parametrize("layout", ["legacy", "comfy_quant"])
def test_scaled_fp8_base_is_merged_with_recomputed_scales(tmp_path, layout):
    from lorabox.quant.fp8 import decode_fp8, quantize_scaled

    rng = np.random.default_rng(15)
    base = _scaled_base(rng, layout)
    scale_key = ".scale_weight" if layout == "legacy" else ".weight_scale"
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", every=3, alpha=4.0, text_encoders=False)
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, 0.7)], tmp_path / "o.safetensors", rounding="nearest")
    out, _ = read_tensors(tmp_path / "o.safetensors")
    assert out.keys() == base.keys()
    deltas = effective_deltas(lora)
    for key in [k for k in base if k.endswith(".weight") and base[k].dtype == "F8_E4M3"]:
        layer = key[: -len(".weight")]
        w = decode_fp8(base[key].array, "F8_E4M3").astype(np.float64) * float(base[layer + scale_key].values())
        if ("unet", layer) not in deltas:
            assert out[key].bits_equal(base[key]) and out[layer + scale_key].bits_equal(base[layer + scale_key])
            continue
        exact = (w + 0.7 * deltas[("unet", layer)]).astype(np.float32)  # float64, rounded once to float32
        bits, scale = quantize_scaled(exact, "F8_E4M3")  # scale recomputed, as ComfyUI does after a LoRA
        assert np.array_equal(out[key].array, bits), key
        assert float(out[layer + scale_key].values()) == float(np.asarray(scale).reshape(-1)[0]), key
    if layout == "legacy":
        assert out["scaled_fp8"].bits_equal(base["scaled_fp8"])


def test_scaled_fp8_base_dequantized_to_bf16_drops_the_scales(tmp_path):
    from lorabox.quant.fp8 import decode_fp8

    rng = np.random.default_rng(16)
    base = _scaled_base(rng, "legacy")
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", every=3, alpha=4.0, text_encoders=False)
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "o.safetensors", dtype="bf16")
    out, _ = read_tensors(tmp_path / "o.safetensors")
    assert not any(k.endswith(".scale_weight") or k == "scaled_fp8" for k in out)
    deltas = effective_deltas(lora)
    for (_, layer), delta in deltas.items():
        key = layer + ".weight"
        w = decode_fp8(base[key].array, "F8_E4M3").astype(np.float64) * float(base[layer + ".scale_weight"].values())
        assert torch.equal(as_torch(out[key]), torch.from_numpy(w + delta).to(torch.bfloat16)), key
    with pytest.raises(OutputError, match="scaled-fp8"):
        merge(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "o2.safetensors", dtype="fp8_e5m2")
    assert not (tmp_path / "o2.safetensors").exists()


@pytest.mark.parametrize("layout", ["legacy", "comfy_quant"])
def test_scaled_fp8_output_from_a_bf16_base(tmp_path, layout):
    """--fp8-layout: every matrix becomes fp8 with scale amax/max of the merged float32 (ComfyUI's recipe; the
    layer layouts are checked against ComfyUI's own ops in test_fp8.py); the rest keeps its dtype; lorabox's
    scaled-fp8 reader finds every layer, and the output merges again keeping its type."""
    from lorabox.io.safetensors import read_header
    from lorabox.quant.fp8 import detect_scaled_fp8, quantize_scaled

    rng = np.random.default_rng(17)
    base = flux_base(rng, "BF16")
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", every=3, alpha=4.0, text_encoders=False)
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, 0.7)], tmp_path / "o.safetensors", dtype="fp8_e4m3fn",
          rounding="nearest", fp8_layout=layout)
    out, _ = read_tensors(tmp_path / "o.safetensors")
    scale_key = ".scale_weight" if layout == "legacy" else ".weight_scale"
    deltas = effective_deltas(lora)
    matrices = [k for k in base if base[k].ndim == 2]
    for key in matrices:
        layer = key[: -len(".weight")]
        w = base[key].values()
        if ("unet", layer) in deltas:
            w = w + 0.7 * deltas[("unet", layer)]
        bits, scale = quantize_scaled(w.astype(np.float32), "F8_E4M3")
        assert out[key].dtype == "F8_E4M3" and np.array_equal(out[key].array, bits), key
        assert out[layer + scale_key].array.tobytes() == np.float32(scale).tobytes(), key
    for key in set(base) - set(matrices):
        assert out[key].bits_equal(base[key]), key
    info = detect_scaled_fp8(read_header(tmp_path / "o.safetensors")[0])
    assert info.layout == layout and len(info.layers) == len(matrices)
    assert ("scaled_fp8" in out) == (layout == "legacy")
    merge(tmp_path / "o.safetensors", [(path, 0.1)], tmp_path / "o2.safetensors", rounding="nearest")
    again, _ = read_tensors(tmp_path / "o2.safetensors")
    assert again.keys() == out.keys()
    with pytest.raises(OutputError, match="needs --dtype fp8"):
        merge(tmp_path / "base.safetensors", [(path, 0.7)], tmp_path / "x.safetensors", dtype="bf16", fp8_layout=layout)
    with pytest.raises(OutputError, match="already scaled"):
        merge(tmp_path / "o.safetensors", [(path, 0.7)], tmp_path / "x.safetensors", dtype="fp8_e4m3fn",
              fp8_layout=layout)
    assert not (tmp_path / "x.safetensors").exists()


def test_sdxl_single_file_text_encoder_2_is_openclip_and_diffusers_agrees(tmp_path):
    """SDXL single files keep te2 in OpenCLIP names with q, k, v fused in `attn.in_proj_weight`. A te2 LoRA
    (HF names) merged by lorabox, then read by diffusers' own single-file converter, gives diffusers' q/k/v/out/fc
    weights = base + ratio * delta: diffusers decides which rows are q, k and v."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    h, prefix = 8, "conditioner.embedders.1.model."
    rng = np.random.default_rng(18)
    base = {}
    for i in range(32):
        p = f"{prefix}transformer.resblocks.{i}."
        base[p + "attn.in_proj_weight"] = rand(rng, (3 * h, 16), "F32")
        base[p + "attn.in_proj_bias"] = rand(rng, (3 * h,), "F32")
        base[p + "attn.out_proj.weight"] = rand(rng, (h, 16), "F32")
        base[p + "mlp.c_fc.weight"] = rand(rng, (4 * h, 16), "F32")
        base[p + "mlp.c_proj.weight"] = rand(rng, (h, 16), "F32")
        base[p + "ln_1.weight"] = rand(rng, (16,), "F32")
    write_tensors(tmp_path / "sdxl.safetensors", base)
    lora = random_lora("sdxl", seed=19, every=1, alpha=4.0)
    lora.adapters = {k: a for k, a in lora.adapters.items() if a.component == "clip_g" and a.module != "text_projection"}
    for a in lora.adapters.values():  # rows as the base has them: h per q/k/v/out/fc2, 4h for fc1
        rows = 4 * h if a.module.endswith("fc1") else h
        a.tensors["up"] = rand(rng, (rows, a.tensors["up"].shape[1]), "BF16")
    path = write_lora(tmp_path / "te2.safetensors", lora, "kohya")
    report = merge(tmp_path / "sdxl.safetensors", [(path, 0.6)], tmp_path / "o.safetensors")
    assert report.layout == "single_file" and report.merged == 32 * 4  # q, k, v share in_proj_weight
    out, _ = read_tensors(tmp_path / "o.safetensors")

    def hf(sd):
        ckpt = {k: torch.from_numpy(np.array(v.values())) for k, v in sd.items()}
        return convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=h)), ckpt, prefix)

    before, after = hf(base), hf(out)
    deltas = effective_deltas(lora)
    assert len(deltas) == 32 * 6
    for (_, module), delta in deltas.items():
        key = module + ".weight"
        want = (before[key].double() + 0.6 * torch.from_numpy(delta)).float()
        assert torch.equal(after[key], want), key
    untouched = [k for k in before if k.endswith(("q_proj.bias", "layer_norm1.weight"))]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)


def test_disk_full_mid_stream_removes_the_partial_output(tmp_path, monkeypatch):
    """The space check passed, then the disk filled up while writing: one line, exit 2, no file left behind."""
    import errno

    from click.testing import CliRunner

    from lorabox.cli import main
    from lorabox.io.safetensors import StreamWriter

    write_tensors(tmp_path / "base.safetensors", flux_base(np.random.default_rng(20)))
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", every=5, text_encoders=False), "kohya")
    real_write, calls = StreamWriter.write, []

    def write(self, name, t):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, t)

    monkeypatch.setattr(StreamWriter, "write", write)
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "base.safetensors"), "--lora", str(lora),
                                       "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2 and len(calls) == 5
    assert "no space left on the device" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "l.safetensors"]


def test_scaled_fp8_output_loads_in_comfyui_scaled_fp8_ops(tmp_path):
    """The peer itself: ComfyUI's `scaled_fp8_ops` Linear layers load the merged legacy-layout file (strict) and their
    dequantized weights equal W + 0.7 * delta quantized with amax/max, i.e. what lorabox wrote decodes as intended."""
    import safetensors.torch

    from tests.oracles.comfy import comfy_available, import_comfy

    if not comfy_available():
        pytest.fail("the ComfyUI oracle is missing: run scripts/get_oracles.sh")
    import_comfy()
    import comfy.ops

    from lorabox.quant.fp8 import dequantize_scaled, quantize_scaled

    base = flux_base(np.random.default_rng(21), "BF16")
    write_tensors(tmp_path / "base.safetensors", base)
    lora = random_lora("flux1", every=3, alpha=4.0, text_encoders=False)
    path = write_lora(tmp_path / "l.safetensors", lora, "kohya")
    merge(tmp_path / "base.safetensors", [(path, 0.7)], tmp_path / "o.safetensors", dtype="fp8_e4m3fn",
          rounding="nearest", fp8_layout="legacy")
    sd = safetensors.torch.load_file(str(tmp_path / "o.safetensors"))
    marker = sd.pop("scaled_fp8")
    ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False, override_dtype=marker.dtype)
    deltas = effective_deltas(lora)
    layers = [k[: -len(".weight")] for k in base if base[k].ndim == 2][:6]
    for layer in layers:
        rows, cols = base[layer + ".weight"].shape
        lin = ops.Linear(cols, rows, bias=True)
        keys = {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".")}
        missing, unexpected = lin.load_state_dict(keys, strict=True)
        assert not missing and not unexpected
        w = base[layer + ".weight"].values()
        if ("unet", layer) in deltas:
            w = w + 0.7 * deltas[("unet", layer)]
        bits, scale = quantize_scaled(w.astype(np.float32), "F8_E4M3")
        np.testing.assert_array_equal(lin.convert_weight(lin.weight).detach().float().numpy(),
                                      dequantize_scaled(bits, "F8_E4M3", scale))


@pytest.mark.parametrize("quant", [None, "Q8_0"])
def test_early_writeback_leaves_the_bytes_unchanged(tmp_path, monkeypatch, quant):
    """The safetensors and GGUF writers start writeback every Writeback.EVERY bytes (posix_fadvise); at 4 KB it runs
    many times per merge."""
    from lorabox.io.files import Writeback

    base = flux_base(np.random.default_rng(7))
    write_tensors(tmp_path / "base.safetensors", base)
    lora = write_lora(tmp_path / "l.safetensors", random_lora("flux1", seed=8, every=2, text_encoders=False), "kohya")
    merge(tmp_path / "base.safetensors", [(lora, 0.8)], tmp_path / "once.out", quant=quant)
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(Writeback, "EVERY", 4096)
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: (calls.append(a[1:3]), real(*a))[1])
    merge(tmp_path / "base.safetensors", [(lora, 0.8)], tmp_path / "often.out", quant=quant)
    assert len(calls) > 10 and all(n > 0 for _, n in calls)
    assert (tmp_path / "once.out").read_bytes() == (tmp_path / "often.out").read_bytes()


def test_delta_shape_is_the_shape_of_the_delta_for_every_kind():
    """`Adapter.delta_shape` (what the plan checks against the base before any work) mirrors `Adapter.delta`."""
    from lorabox.lora import Adapter

    rng = np.random.default_rng(24)
    cases = {
        "lora": {"up": (8, 4), "down": (4, 16)},
        "lora conv": {"up": (8, 4, 1, 1), "down": (4, 6, 3, 3)},
        "lora tucker": {"up": (8, 4), "mid": (4, 4, 3, 3), "down": (4, 6)},
        "lora + diff": {"up": (8, 4), "down": (4, 16), "diff": (8, 16)},
        "loha": {"hada_w1_a": (8, 2), "hada_w1_b": (2, 16), "hada_w2_a": (8, 2), "hada_w2_b": (2, 16)},
        "loha tucker": {"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 8), "hada_w1_b": (2, 6),
                        "hada_t2": (2, 2, 3, 3), "hada_w2_a": (2, 8), "hada_w2_b": (2, 6)},
        "lokr": {"lokr_w1": (2, 4), "lokr_w2": (4, 4)},
        "lokr decomposed": {"lokr_w1_a": (2, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4)},
        "lokr tucker": {"lokr_w1": (2, 2), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 3)},
        "lokr conv": {"lokr_w1": (2, 2), "lokr_w2": (4, 3, 3, 3)},
        "diff": {"diff": (8, 16)},
    }
    for name, shapes in cases.items():
        a = Adapter("unet", "m", None, {k: rand(rng, s) for k, s in shapes.items()}, Tensor.scalar(2.0))
        assert a.delta_shape() == a.delta().shape, name
    assert Adapter("unet", "m", None, {"diff_b": rand(rng, (8,))}, None).delta_shape() is None
