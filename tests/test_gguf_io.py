"""GGUF merge bases and outputs: our streaming writer read back by gguf-py's own reader (the format's oracle),
gguf-py's writer (the peer) read by ours, ComfyUI-GGUF's type rules, bad files, atomic writes."""
from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from lorabox.errors import InputFileError  # noqa: E402
from lorabox.io.gguf import (  # noqa: E402
    ORIG_SHAPE_PREFIX, GGUFStreamWriter, choose_qtype, encode, open_gguf, plan_qtypes,
)

# name, qtype, numpy shape, stored shape (None: as is)
ENTRIES = [
    ("blk.f32.weight", "F32", (3, 5), None),
    ("blk.f16.weight", "F16", (4, 7), None),
    ("blk.bf16.weight", "BF16", (2, 33), None),
    ("blk.bias", "F32", (13,), None),
    ("blk.q8_0.weight", "Q8_0", (4, 64), None),
    ("blk.q4_0.weight", "Q4_0", (3, 96), None),
    ("blk.q4_1.weight", "Q4_1", (2, 128), None),
    ("blk.q5_0.weight", "Q5_0", (5, 32), None),
    ("blk.q5_1.weight", "Q5_1", (2, 2, 64), None),
    ("blk.q4_k.weight", "Q4_K", (2, 512), None),
    ("blk.q5_k.weight", "Q5_K", (3, 256), None),
    ("blk.q6_k.weight", "Q6_K", (2, 256), None),
    ("conv.reshaped.weight", "Q6_K", (8, 8, 3, 4), (3, 256)),   # SD-style conv stored as (n/256, 256)
    ("lin.reshaped.weight", "F16", (4, 320), (5, 256)),
]
KV = {"general.name": "tiny", "general.file_type": 7, "general.quantization_version": 2,
      "lorabox.ratio": 0.5, "lorabox.flag": True, "lorabox.list": [1, 2, 3], "lorabox.tags": ["a", "b"]}


def values(shape, seed):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.1).astype(np.float32)


def write_sample(path, arch="flux"):
    originals, encoded = {}, {}
    with GGUFStreamWriter(path, arch, ENTRIES, KV) as w:
        for i, (name, qtype, shape, stored) in enumerate(ENTRIES):
            x = values(shape, i)
            data = encode(x, qtype, stored)
            originals[name], encoded[name] = x, data
            w.write(name, data)
    return originals, encoded


def oracle_values(rt) -> np.ndarray:
    """gguf-py's own decoding of one ReaderTensor, in its stored numpy shape."""
    stored = tuple(reversed([int(d) for d in rt.shape]))
    if rt.tensor_type == T.F32:
        return np.asarray(rt.data, np.float32).reshape(stored)
    if rt.tensor_type == T.F16:
        return np.asarray(rt.data).astype(np.float32).reshape(stored)
    return gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type).reshape(stored)


def test_stream_writer_all_types_read_by_gguf_py_and_by_us(tmp_path):
    path = tmp_path / "all.gguf"
    originals, encoded = write_sample(path)
    assert sorted(os.listdir(tmp_path)) == ["all.gguf"]

    # --- the oracle: gguf.GGUFReader
    r = gguf.GGUFReader(path)
    assert r.get_field("general.architecture").contents() == "flux"
    assert [t.name for t in r.tensors] == [e[0] for e in ENTRIES]
    for (name, qtype, shape, stored), rt in zip(ENTRIES, r.tensors):
        stored = stored or shape
        assert rt.tensor_type.name == qtype
        assert tuple(reversed([int(d) for d in rt.shape])) == stored  # ggml order in the file
        assert rt.data_offset % r.alignment == 0
        field = r.get_field(ORIG_SHAPE_PREFIX + name)
        if stored != shape:  # as loader.py::get_orig_shape requires: ARRAY of INT32, numpy order
            assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            assert tuple(field.contents()) == shape
        else:
            assert field is None
        want = oracle_values(rt)
        got_raw = np.asarray(rt.data).reshape(-1).view(np.uint8)
        assert np.array_equal(got_raw, encoded[name].reshape(-1).view(np.uint8))
        # values close to what went in (the quantizers' error, not the container's)
        err = np.abs(want.reshape(shape) - originals[name]).max()
        assert err < {"F32": 1e-7, "F16": 1e-3, "BF16": 2e-3, "Q8_0": 2e-3}.get(qtype, 0.08), (name, err)
    assert r.get_field("general.file_type").types == [gguf.GGUFValueType.UINT32]
    assert r.get_field("lorabox.list").types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert r.get_field("lorabox.tags").contents() == ["a", "b"]

    # --- our reader agrees with the oracle
    base = open_gguf(path)
    assert base.architecture == "flux"
    assert base.kv == {**KV, "lorabox.ratio": pytest.approx(0.5)}
    assert [t.name for t in base.tensors] == [e[0] for e in ENTRIES]
    for (name, qtype, shape, stored), t, rt in zip(ENTRIES, base.tensors, r.tensors):
        assert (t.qtype, t.shape, t.stored_shape) == (qtype, shape, stored or shape)
        assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes
        assert np.array_equal(base.read_raw(t), np.asarray(rt.data).reshape(-1).view(np.uint8))
        got = base.read(t)
        assert got.dtype == np.float32 and got.shape == shape
        assert np.array_equal(got, oracle_values(rt).reshape(shape)), name


def test_copy_through_keeps_kv_types_and_bytes(tmp_path):
    src = tmp_path / "a.gguf"
    write_sample(src, arch="sdxl")
    base = open_gguf(src)
    entries = [(t.name, t.qtype, t.shape, t.stored_shape) for t in base.tensors]
    dst = tmp_path / "b.gguf"
    with GGUFStreamWriter(dst, base.architecture, entries, base.kv, base.kv_types) as w:
        for t in base.tensors:
            w.write(t.name, base.read_raw(t))
    again = open_gguf(dst)
    assert again.architecture == "sdxl" and again.kv == base.kv and again.kv_types == base.kv_types
    assert again.tensors == base.tensors
    assert src.read_bytes() == dst.read_bytes()


def test_peer_gguf_writer_file_read_by_us(tmp_path):
    """A file as ComfyUI-GGUF's convert.py makes it with gguf.GGUFWriter (add_tensor, orig_shape add_array)."""
    path = tmp_path / "peer.gguf"
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(path=None, arch="sd1")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    conv = rng.standard_normal((320, 4, 3, 3)).astype(np.float32)  # convert.py shape fix: 11520 -> (45, 256)
    w.add_array(f"{ORIG_SHAPE_PREFIX}input_blocks.0.0.weight", tuple(int(d) for d in conv.shape))
    w.add_tensor("input_blocks.0.0.weight", gguf.quants.quantize(conv.reshape(45, 256), T.F16), raw_dtype=T.F16)
    bias = rng.standard_normal(320).astype(np.float32)
    w.add_tensor("input_blocks.0.0.bias", bias, raw_dtype=T.F32)
    lin = rng.standard_normal((64, 256)).astype(np.float32)
    w.add_tensor("out.q8.weight", gguf.quants.quantize(lin, T.Q8_0), raw_dtype=T.Q8_0)
    bf = rng.standard_normal((3, 64)).astype(np.float32)
    w.add_tensor("out.bf16.weight", gguf.quants.quantize(bf, T.BF16), raw_dtype=T.BF16)
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    base = open_gguf(path)
    assert base.architecture == "sd1"
    assert base.kv["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert not any(k.startswith(ORIG_SHAPE_PREFIX) for k in base.kv)
    got = {t.name: t for t in base.tensors}
    assert [t.name for t in base.tensors] == ["input_blocks.0.0.weight", "input_blocks.0.0.bias", "out.q8.weight",
                                              "out.bf16.weight"]
    t = got["input_blocks.0.0.weight"]
    assert (t.qtype, t.shape, t.stored_shape) == ("F16", (320, 4, 3, 3), (45, 256))
    np.testing.assert_array_equal(base.read(t), conv.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(base.read(got["input_blocks.0.0.bias"]), bias)
    t = got["out.q8.weight"]
    assert (t.qtype, t.shape) == ("Q8_0", (64, 256))
    np.testing.assert_array_equal(base.read(t), gguf.quants.dequantize(gguf.quants.quantize(lin, T.Q8_0), T.Q8_0))
    t = got["out.bf16.weight"]
    assert (t.qtype, t.shape) == ("BF16", (3, 64))
    np.testing.assert_array_equal(base.read(t), gguf.quants.dequantize(gguf.quants.quantize(bf, T.BF16), T.BF16))


FLUX = [  # name, shape, source dtype, target, expected qtype
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "BF16", "Q4_K_M", "Q5_K"),
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "BF16", "Q5_K_M", "Q6_K"),
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "BF16", "Q8_0", "Q8_0"),
    ("double_blocks.0.img_attn.proj.weight", (3072, 3072), "BF16", "Q4_K_M", "Q4_K"),
    ("double_blocks.0.img_mlp.2.weight", (3072, 12288), "BF16", "Q4_K_M", "Q4_K"),  # no ffn rule for Flux names
    ("single_blocks.0.linear1.weight", (21504, 3072), "BF16", "Q4_0", "Q4_0"),
    ("double_blocks.0.img_mod.lin.weight", (18432, 3072), "BF16", "Q5_K_S", "Q5_K"),
    ("img_in.weight", (3072, 64), "BF16", "Q8_0", "BF16"),                 # kept by lcpp.patch, BF16 source
    ("img_in.weight", (3072, 64), "F16", "Q8_0", "F16"),
    ("guidance_in.in_layer.weight", (3072, 256), "BF16", "Q4_K_M", "BF16"),
    ("final_layer.linear.weight", (64, 3072), "BF16", "Q6_K", "BF16"),
    ("double_blocks.0.img_attn.qkv.bias", (9216,), "BF16", "Q8_0", "F32"),  # 1-D: F32 from BF16/F32
    ("double_blocks.0.img_attn.norm.query_norm.scale", (128,), "BF16", "Q8_0", "F32"),
    ("double_blocks.0.img_attn.norm.query_norm.scale", (128,), "F16", "Q8_0", "F16"),  # F16 source stays F16
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "BF16", "F16", "F16"),
    ("double_blocks.0.img_attn.qkv.weight", (9216, 3072), "BF16", "BF16", "BF16"),
    ("double_blocks.0.img_attn.qkv.bias", (9216,), "BF16", "F16", "F32"),
]

SDXL = [  # name, shape, source dtype, target, expected qtype, stored shape
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_v.weight", (640, 640), "F16", "Q4_K_M", "Q6_K", (1600, 256)),
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", (640, 640), "F16", "Q4_K_M", "Q4_K", (1600, 256)),
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", (640, 640), "F16", "Q8_0", "Q8_0", (1600, 256)),
    ("input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", (640, 2048), "F16", "Q4_K_M", "Q4_K", (640, 2048)),
    ("input_blocks.4.1.transformer_blocks.0.ff.net.2.weight", (640, 2560), "F16", "Q4_K_M", "Q6_K", (640, 2560)),
    ("input_blocks.4.1.transformer_blocks.0.ff.net.2.weight", (640, 2560), "F16", "Q4_0", "Q4_1", (640, 2560)),
    ("input_blocks.1.0.in_layers.2.weight", (320, 320, 3, 3), "F16", "Q5_K_M", "Q5_K", (3600, 256)),
    ("input_blocks.1.1.proj_in.weight", (320, 320, 1, 1), "F16", "Q4_K_S", "Q4_K", (400, 256)),
    ("input_blocks.0.0.weight", (320, 4, 3, 3), "F16", "Q8_0", "F16", (45, 256)),       # kept, reshaped anyway
    ("time_embed.0.weight", (1280, 320), "F16", "Q8_0", "F16", (1600, 256)),
    ("label_emb.0.0.weight", (1280, 2816), "BF16", "Q4_K_M", "BF16", (1280, 2816)),
    ("out.2.weight", (4, 320, 3, 3), "F16", "Q8_0", "F16", (45, 256)),
    ("out.0.weight", (320,), "F16", "Q8_0", "F16", (320,)),
    ("out.0.weight", (320,), "F32", "Q8_0", "F32", (320,)),
    ("middle_block.1.norm.weight", (1280,), "BF16", "Q6_K", "F32", (1280,)),
    ("odd.rows.weight", (30, 100), "F16", "Q4_K_M", "F16", (30, 100)),   # 3000 values: no reshape, rows of 100
    ("odd.rows.weight", (30, 100), "F16", "Q8_0", "F16", (30, 100)),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight", (320, 320), "F16", "Q5_K_M", "Q6_K", (400, 256)),
]


@pytest.mark.parametrize("name,shape,src,target,want", FLUX)
def test_choose_qtype_flux(name, shape, src, target, want):
    assert choose_qtype(name, shape, target, src, "flux") == (want, shape)


@pytest.mark.parametrize("name,shape,src,target,want,stored", SDXL)
def test_choose_qtype_sdxl(name, shape, src, target, want, stored):
    assert choose_qtype(name, shape, target, src, "sdxl") == (want, stored)


def test_choose_qtype_pure_hiprec_and_counter():
    qkv = ("double_blocks.0.img_attn.qkv.weight", (9216, 3072))
    assert choose_qtype(*qkv, "Q4_K", "BF16", "flux", pure=True) == ("Q4_K", (9216, 3072))
    assert choose_qtype(*qkv, "Q4_K", "BF16", "flux") == ("Q5_K", (9216, 3072))  # llama-quantize: Q4_K = Q4_K_M
    assert choose_qtype("blocks.0.modulation", (1, 6, 5120), "Q8_0", "BF16", "wan")[0] == "F32"   # keys_hiprec
    assert choose_qtype("blocks.0.modulation", (1, 6, 5120), "Q8_0", "F16", "wan")[0] == "F16"
    assert choose_qtype("blocks.0.self_attn.v.weight", (5120, 5120), "Q4_K_M", "BF16", "wan")[0] == "Q6_K"
    assert choose_qtype("blocks.0.ffn.2.weight", (5120, 13824), "Q4_K_M", "BF16", "wan")[0] == "Q6_K"
    assert choose_qtype("head.head.weight", (64, 5120), "Q4_K_M", "BF16", "wan")[0] == "BF16"
    # Flux is never reshaped; rows of 3072 are fine for K-quants, rows of 64 are kept anyway
    entries = [(f"input_blocks.{i}.1.transformer_blocks.0.attn1.to_v.weight", (640, 640), "F16") for i in range(6)]
    assert [q for q, _ in plan_qtypes(entries, "Q4_K_S", "sdxl")] == ["Q5_K"] * 4 + ["Q4_K"] * 2
    with pytest.raises(ValueError):
        choose_qtype(*qkv, "Q3_K_M", "BF16", "flux")


def test_chosen_types_write_and_read(tmp_path):
    """choose_qtype's answers go straight into the writer (reshape + orig_shape) and come back."""
    specs = [(n, s, src) for n, s, src, _, _, _ in SDXL[:12:3]] + [("out.0.weight", (320,), "F32")]
    plan = plan_qtypes(specs, "Q4_K_M", "sdxl")
    entries = [(n, q, s, st) for (n, s, _), (q, st) in zip(specs, plan)]
    xs = {n: values(s, i) for i, (n, s, _) in enumerate(specs)}
    path = tmp_path / "sdxl-Q4_K_M.gguf"
    with GGUFStreamWriter(path, "sdxl", entries, {"general.file_type": 15}) as w:
        for n, q, s, st in entries:
            w.write(n, encode(xs[n], q, st))
    base = open_gguf(path)
    for (n, q, s, st), t in zip(entries, base.tensors):
        assert (t.name, t.qtype, t.shape, t.stored_shape) == (n, q, s, st)
        assert np.abs(base.read(t) - xs[n]).max() < 0.05


def test_bad_files_raise_input_file_error(tmp_path):
    good = tmp_path / "good.gguf"
    write_sample(good)
    blob = good.read_bytes()
    base = open_gguf(good)
    last = base.tensors[-1]
    for cut in (0, 3, 20, 200, base.tensors[0].offset - 1, last.offset + last.nbytes // 2):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(blob[:cut])
        with pytest.raises(InputFileError) as info:
            open_gguf(bad)
        msg = str(info.value)
        assert "\n" not in msg and str(bad) in msg
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + bytes(64))
    with pytest.raises(InputFileError, match="not a GGUF"):
        open_gguf(not_gguf)
    with pytest.raises(InputFileError, match="no such file"):
        open_gguf(tmp_path / "missing.gguf")


def test_interrupt_or_error_leaves_no_file(tmp_path):
    path = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        with GGUFStreamWriter(path, "flux", ENTRIES, KV) as w:
            name, qtype, shape, stored = ENTRIES[0]
            w.write(name, encode(values(shape, 0), qtype, stored))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="expected blk.f16.weight"):  # out of order
        with GGUFStreamWriter(path, "flux", ENTRIES, KV) as w:
            name, qtype, shape, stored = ENTRIES[0]
            w.write(name, encode(values(shape, 0), qtype, stored))
            w.write("blk.q8_0.weight", encode(values((4, 64), 0), "Q8_0"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="never written"):   # a clean exit with tensors missing
        with GGUFStreamWriter(path, "flux", ENTRIES, KV) as w:
            w.write(ENTRIES[0][0], encode(values(ENTRIES[0][2], 0), "F32"))
    assert os.listdir(tmp_path) == []
