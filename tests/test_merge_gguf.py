"""GGUF merges: a GGUF base keeps its types (patched tensors equal gguf.quants.quantize of the merged float tensor,
the rest byte for byte); --quant writes GGUF with ComfyUI-GGUF's rules, read back by gguf's own reader."""
import numpy as np
import pytest
import torch

from lorabox.io.gguf import GGUFStreamWriter, encode, open_gguf
from lorabox.io.safetensors import write_tensors
from lorabox.merge.engine import merge
from tests.helpers import effective_deltas, random_lora
from tests.test_merge import flux_base, write_lora


def _gguf_base(path, rng, qtype="Q8_0"):
    base = flux_base(rng, "F32", n_in=256)
    entries, data = [], {}
    for key, t in base.items():
        q = qtype if t.ndim == 2 else "F32"
        entries.append((key, q, t.shape))
        data[key] = encode(t.values32(), q)
    with GGUFStreamWriter(path, "flux", entries, {"note": "tiny"}) as w:
        for key, _, _ in entries:
            w.write(key, data[key])
    return base


def _lora(tmp_path, n_in=256, every=2):
    lora = random_lora("flux1", seed=3, every=every, alpha=4.0, text_encoders=False)
    rng = np.random.default_rng(4)
    from lorabox.tensor import Tensor

    for a in lora.adapters.values():
        a.tensors["down"] = Tensor.from_values(rng.standard_normal((4, n_in)) * 0.1, "BF16")
    return lora, write_lora(tmp_path / "l.safetensors", lora, "kohya")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_gguf_base_keeps_types_and_matches_gguf_quantize(tmp_path, qtype):
    import gguf

    rng = np.random.default_rng(0)
    _gguf_base(tmp_path / "base.gguf", rng, qtype)
    lora, path = _lora(tmp_path)
    report = merge(tmp_path / "base.gguf", [(path, 0.8)], tmp_path / "out.gguf")
    assert report.layout == "gguf" and report.merged > 0
    assert report.stages["computing"] > 0 and sum(report.stages.values()) <= report.seconds
    src, out = open_gguf(tmp_path / "base.gguf"), open_gguf(tmp_path / "out.gguf")
    assert out.architecture == "flux" and out.kv["note"] == "tiny" and "lorabox.merge" in out.kv
    deltas = effective_deltas(lora)
    by_name = {t.name: t for t in src.tensors}
    for t in out.tensors:
        s = by_name[t.name]
        assert t.qtype == s.qtype
        module = t.name[: -len(".weight")]
        if ("unet", module) in deltas and t.name.endswith(".weight"):
            merged = (src.read(s).astype(np.float64) + 0.8 * deltas[("unet", module)]).astype(np.float32)
            want = gguf.quants.quantize(merged, getattr(gguf.GGMLQuantizationType, qtype))
            assert np.array_equal(np.asarray(out.read_raw(t)).reshape(-1), want.reshape(-1)), t.name
        else:
            assert np.array_equal(out.read_raw(t), src.read_raw(s)), t.name
    src.close()
    out.close()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_quant_writes_comfyui_gguf_from_safetensors(tmp_path, qtype):
    import gguf

    rng = np.random.default_rng(5)
    base = flux_base(rng, "BF16", n_in=256)
    write_tensors(tmp_path / "base.safetensors", {"model.diffusion_model." + k: v for k, v in base.items()})
    lora, path = _lora(tmp_path)
    merge(tmp_path / "base.safetensors", [(path, 1.0)], tmp_path / "out.gguf", quant=qtype)
    reader = gguf.GGUFReader(tmp_path / "out.gguf")  # the format's own reader
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "flux"
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(base)  # names without model.diffusion_model.
    deltas = effective_deltas(lora)
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        exact = base[name].values()
        if ("unet", module) in deltas and name.endswith(".weight"):
            exact = exact + deltas[("unet", module)]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(exact.shape)
        kind = t.tensor_type.name
        if name.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")) or exact.ndim == 1:
            assert kind in ("BF16", "F32")  # ComfyUI-GGUF keeps these in high precision
        else:  # "Q4_K" is llama-quantize's Q4_K_M: fused qkv and the like are bumped to Q5_K/Q6_K
            assert kind in {"Q8_0": {"Q8_0"}, "Q4_K": {"Q4_K", "Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"}}[qtype], (name, kind)
        ref = torch.from_numpy(exact).float().numpy()
        tol = {"Q8_0": 0.01, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03, "BF16": 0.01, "F32": 1e-6}[kind] * np.abs(ref).max()
        assert np.abs(got - ref).max() <= tol, (name, kind)


def test_gguf_base_refuses_dtype_and_quant(tmp_path):
    from lorabox.errors import OutputError

    _gguf_base(tmp_path / "base.gguf", np.random.default_rng(1))
    _, path = _lora(tmp_path)
    with pytest.raises(OutputError, match="keeping its types"):
        merge(tmp_path / "base.gguf", [(path, 1.0)], tmp_path / "o.gguf", quant="Q4_0")
    assert not (tmp_path / "o.gguf").exists()


def test_gguf_base_of_a_type_lorabox_cannot_encode_stops_before_writing(tmp_path):
    """A Q3_K tensor the LoRA patches: refused up front (gguf-py decodes Q3_K but nothing here encodes it)."""
    from lorabox.errors import OutputError

    base = flux_base(np.random.default_rng(2), "F32", n_in=256)
    entries = [(k, "Q3_K" if t.ndim == 2 else "F32", t.shape) for k, t in base.items()]
    with GGUFStreamWriter(tmp_path / "base.gguf", "flux", entries) as w:
        for key, q, shape in entries:
            w.write(key, np.zeros(int(np.prod(shape)) // 256 * 110, np.uint8) if q == "Q3_K" else base[key].values32())
    _, path = _lora(tmp_path)
    with pytest.raises(OutputError, match=r"base\.gguf: the LoRA patches \d+ tensor\(s\) of type Q3_K \(first: "
                                          r".*\), which lorabox cannot quantize again"):
        merge(tmp_path / "base.gguf", [(path, 1.0)], tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".o.gguf*"))
