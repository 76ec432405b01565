"""The command line: one clear line and a non-zero exit for bad input, no traceback, nothing written."""
import json
import subprocess
import sys

import pytest

from lorabox.conversion import convert
from lorabox.io.safetensors import write_tensors
from lorabox.tensor import Tensor
from tests.helpers import assert_one_line_error, heavy_imports, random_lora

CLI = [sys.executable, "-m", "lorabox"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "flux_kohya.safetensors"
    res = convert(random_lora("flux1", every=4), "kohya")
    write_tensors(path, res.tensors, res.metadata)
    return path


def _bad_inputs(tmp):
    missing = tmp / "missing.safetensors"
    folder = tmp / "a_folder"
    folder.mkdir()
    truncated = tmp / "truncated.safetensors"
    good = convert(random_lora("sd15", every=10), "kohya")
    write_tensors(truncated, good.tensors, good.metadata)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    header_cut = tmp / "header_cut.safetensors"
    header_cut.write_bytes(data[:40])
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json")
    pickle = tmp / "model.ckpt"
    import torch

    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, pickle)
    not_lora = tmp / "checkpoint.safetensors"
    write_tensors(not_lora, {"model.diffusion_model.input_blocks.0.0.weight": Tensor.zeros((4, 4), "F16"),
                             "first_stage_model.encoder.conv_in.weight": Tensor.zeros((4, 4), "F16")})
    return {
        "missing": (missing, "no such file"),
        "directory": (folder, "is a directory"),
        "truncated": (truncated, "truncated"),
        "header_cut": (header_cut, "truncated"),
        "garbage": (garbage, "not valid JSON"),
        "pickle": (pickle, "pickle"),
        "not_lora": (not_lora, "full model checkpoint"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "header_cut", "garbage", "pickle", "not_lora"])
@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, case, command):
    path, needle = _bad_inputs(tmp_path)[case]
    before = set(tmp_path.rglob("*"))
    args = [command, path] + (["--to", "comfyui", "-o", tmp_path / "out.safetensors"] if command == "convert" else [])
    proc = run(*args)
    assert_one_line_error(proc, str(path), needle)
    assert set(tmp_path.rglob("*")) == before  # no output, no temporary file left


def test_debug_shows_the_traceback(tmp_path):
    proc = run("--debug", "inspect", tmp_path / "missing.safetensors")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unknown_keys_are_an_error_listing_them_and_drop_unknown_reports(tmp_path, kohya_file):
    res = convert(random_lora("flux1", every=9), "kohya")
    tensors = dict(res.tensors)
    tensors["lora_unet_double_blocks_0_img_attn_qkvv.lora_down.weight"] = Tensor.zeros((4, 16), "BF16")
    tensors["lora_unet_double_blocks_0_img_attn_qkvv.lora_up.weight"] = Tensor.zeros((18, 4), "BF16")
    src = tmp_path / "odd.safetensors"
    write_tensors(src, tensors, res.metadata)
    out = tmp_path / "out.safetensors"
    proc = run("convert", src, "--to", "diffusers", "-o", out)
    assert_one_line_error(proc, "2 key(s) not understood", "img_attn_qkvv.lora_down.weight",
                          "nearest known: lora_unet_double_blocks_0_img_attn_qkv", "--drop-unknown")
    assert not out.exists()
    proc = run("convert", src, "--to", "diffusers", "-o", out, "--drop-unknown", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(report["dropped"]) == sorted(k for k in tensors if "qkvv" in k)
    assert out.exists()


def test_output_never_overwrites_an_input_or_an_existing_file(tmp_path, kohya_file):
    proc = run("convert", kohya_file, "--to", "kohya", "-o", kohya_file)
    assert_one_line_error(proc, "is also an input")
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"keep me")
    proc = run("convert", kohya_file, "--to", "comfyui", "-o", target)
    assert_one_line_error(proc, "already exists", "--overwrite")
    assert target.read_bytes() == b"keep me"
    proc = run("convert", kohya_file, "--to", "comfyui", "-o", target, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() != b"keep me"


def test_convert_default_output_name_and_metadata_record(tmp_path, kohya_file):
    src = tmp_path / "lora.safetensors"
    src.write_bytes(kohya_file.read_bytes())
    proc = run("convert", src, "--to", "comfyui")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "lora.comfyui.safetensors"
    from lorabox.io.safetensors import read_header

    _, meta, _ = read_header(out)
    record = json.loads(meta["lorabox.convert"])
    assert record["to"] == "comfyui" and record["architecture"] == "flux1" and record["from"].startswith("kohya")


def test_inspect_json(kohya_file):
    proc = run("inspect", kohya_file, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "flux1"
    assert info["dialect"].startswith("kohya")
    assert info["ranks"] == {"4": info["adapters"]}
    assert set(info["components"]) == {"unet", "clip_l", "t5xxl"}
    human = run("inspect", kohya_file)
    assert "flux1" in human.stdout and "ranks" in human.stdout


def test_help_is_light_and_every_command_has_an_example():
    assert heavy_imports("from lorabox.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
                         ("torch", "diffusers", "transformers", "peft")) == []
    from lorabox.cli import main

    for name in main.commands:
        out = run(name, "--help").stdout
        assert "Example:" in out, name


@pytest.mark.parametrize("torch_state", ["absent", "loaded", "numba", "importing", "distributed"])
def test_entry_point_exit_codes_and_flushed_output(kohya_file, tmp_path, torch_state):
    """`lorabox.cli.run` (the console script, `python -m lorabox`) ends at once, past the interpreter's teardown,
    where torch or numba is loaded (atexit handlers do not run), except in a process of a distributed run; either
    way what the command printed, to a pipe, arrives whole, and the exit code is the command's."""
    setup = {"absent": "",
             "loaded": "import torch\n",
             "numba": "import numba\n",  # a merge that needed numba's certified tiles and no torch
             # a merge refused while merge.compute's thread still imports torch: the module, without its attributes
             "importing": "import types\nsys.modules['torch'] = types.ModuleType('torch')\n",
             "distributed": "import torch, torch.distributed as dist\n"
                            f"dist.init_process_group('gloo', init_method={(tmp_path / 'pg').as_uri()!r}, "
                            "rank=0, world_size=1)\n"}[torch_state]

    def entry(*args):
        code = ("import atexit, sys\n" + setup
                + "atexit.register(lambda: print('torn down', file=sys.stderr))\n"
                + f"sys.argv = ['lorabox', *{[str(a) for a in args]!r}]\n"
                + "from lorabox.cli import run\nrun()\nraise AssertionError('run() returned')")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert ("torn down" in proc.stderr) == (torch_state in ("absent", "distributed")), proc.stderr
        proc.stderr = proc.stderr.replace("torn down\n", "")
        return proc

    ok = entry("inspect", kohya_file, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["architecture"] == "flux1"  # the whole JSON document
    missing = entry("inspect", tmp_path / "missing.safetensors")
    assert missing.returncode == 2
    assert_one_line_error(missing, "missing.safetensors")
    usage = entry("convert", kohya_file, "--to", "nowhere")
    assert usage.returncode == 2 and "nowhere" in usage.stderr
    assert entry("--version").stdout.startswith("lorabox")


def test_convert_and_inspect_do_not_import_torch(kohya_file, tmp_path):
    code = ("from lorabox.conversion import convert_file\nfrom lorabox.summary import inspect_file\n"
            f"inspect_file({str(kohya_file)!r})\n"
            f"convert_file({str(kohya_file)!r}, 'diffusers', {str(tmp_path / 'x.safetensors')!r})")
    assert heavy_imports(code, ("torch", "diffusers")) == []


def test_output_file_mode_follows_umask(tmp_path, kohya_file):
    import os
    import stat

    out = tmp_path / "o.safetensors"
    assert run("convert", kohya_file, "--to", "comfyui", "-o", out).returncode == 0
    old = os.umask(0)
    os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~old


def test_bfl_has_no_text_encoder_names(tmp_path, kohya_file):
    proc = run("convert", kohya_file, "--to", "bfl", "-o", tmp_path / "o.safetensors")
    assert_one_line_error(proc, "no names for text-encoder adapters", "comfyui or kohya")


def test_header_length_with_a_0x80_low_byte_is_not_a_pickle(tmp_path):
    """A safetensors header of 128 + 256k bytes starts with byte 0x80, like a pickle: it must still read."""
    from lorabox.io.safetensors import read_tensors

    for pad in range(0, 300):
        tensors = {"lora_unet_x" + "y" * pad + ".lora_down.weight": Tensor.zeros((1, 1), "F32")}
        path = tmp_path / "t.safetensors"
        write_tensors(path, tensors)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        raise AssertionError("no header with a 0x80 first byte was produced")
    assert list(read_tensors(path)[0]) == list(tensors)


def test_lora_of_an_unknown_architecture_says_what_it_looked_like(tmp_path):
    src = tmp_path / "qwen_image.safetensors"  # Qwen-Image's MLP (Wan, the earlier example here, now has a table)
    stem = "diffusion_model.transformer_blocks.0.img_mlp.net.0.proj"
    write_tensors(src, {f"{stem}.lora_A.weight": Tensor.zeros((4, 8), "BF16"),
                        f"{stem}.lora_B.weight": Tensor.zeros((8, 4), "BF16")})
    proc = run("inspect", src)
    assert_one_line_error(proc, "2 of 2 keys are spelled like LoRA tensors", "no key map", "no table for yet")


def test_stream_writer_failing_close_leaves_no_partial_file(tmp_path):
    from lorabox.io.safetensors import StreamWriter

    with pytest.raises(ValueError, match="never written"):
        with StreamWriter(tmp_path / "o.safetensors", [("a", "F32", (1,)), ("b", "F32", (1,))]) as w:
            w.write("a", Tensor.zeros((1,), "F32"))
    assert list(tmp_path.iterdir()) == []
