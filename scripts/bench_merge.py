r"""Benchmark `lorabox merge` on full-size synthetic checkpoints with the real key layout.

Shapes come from diffusers' models built on the meta device (SDXL UNet fp16, FLUX.1-dev transformer bf16). The SDXL
base is a UNet-only SGM single file: every tensor under `model.diffusion_model.<SGM name>`, the names given by
diffusers' own single-file converter (the key set and shapes of sd-mecha's `sdxl-sgm` diffuser component). Flux
writes the LoRA-targetable weights and biases under their bare BFL names, everything else (norms, embeddings) under
diffusers' names. A kohya LoRA of the given rank on every targetable weight (`lora_unet_<SGM or BFL name, . -> _>`)
is merged at 0.8; the script reports wall time, peak RSS of the merge process, and the ratio to a plain copy (`cp`)
of the same file in the same run, for each `--device` given, then once more with the base's sha256 remembered from
the first merge (the next LoRA on the same base). On Linux each line also gives the CPU-s the whole machine had
stolen by its hypervisor and left idle meanwhile. `--dtype fp8_e4m3fn` times an fp8 output instead, `--quant
Q8_0` (or any GGUF type) a GGUF output.

    .venv/bin/python scripts/bench_merge.py --model sdxl --rank 32
    .venv/bin/python scripts/bench_merge.py --model flux1 --rank 64 --dir /work/bench --keep   # needs ~50 GB free
    .venv/bin/python scripts/bench_merge.py --model sdxl --rank 32 --rounds 5   # median ratios of 5 interleaved rounds
    .venv/bin/python scripts/bench_merge.py --model sdxl --rank 32 --peer   # + sd-mecha, diffusers and PEFT
    .venv/bin/python scripts/bench_merge.py --model sdxl --rank 32 --quant Q4_K --dir /work/bench_sdxl --keep
    .venv/bin/python scripts/bench_merge.py --model sdxl --peer --check --subset 'input_blocks\.4\.'   # quick
    .venv/bin/python scripts/bench_merge.py --model flux1 --rank 64 --dir /work/bench --keep --cold   # base not cached

With --peer (SDXL), sd-mecha (scripts/peer_sdmecha_merge.py: add_difference of the LoRA converted to `sdxl-sgm`)
merges the same LoRA into the same single file; then the base is also written as a diffusers UNet folder and
lorabox, diffusers (scripts/peer_diffusers_merge.py: load_lora_weights, fuse_lora, save_pretrained) and PEFT
(scripts/peer_peft_merge.py: LoraModel, merge_and_unload, save_pretrained) merge the same LoRA into it, each peer's
weights compared with lorabox's afterwards. --check compares sd-mecha's output with lorabox's (untimed). --subset REGEX keeps only the
checkpoint keys (and LoRA modules) the regex finds, and skips the diffusers folder: a quick run for development.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorabox.io.safetensors import StreamWriter, write_tensors  # noqa: E402
from lorabox.keymap import load_architecture  # noqa: E402
from lorabox.tensor import Tensor  # noqa: E402
from scripts.bench_convert import FLUX1_DEV  # noqa: E402

SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def layout(model: str) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, tuple[int, ...]]]:
    """(checkpoint key -> (shape, dtype), canonical module -> weight shape)."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls, cfg, dtype, prefix = ((FluxTransformer2DModel, FLUX1_DEV, "BF16", "") if model == "flux1"
                               else (UNet2DConditionModel, SDXL, "F16", "model.diffusion_model."))
    with torch.device("meta"):
        net = cls(**cfg)
    sd = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if model == "sdxl":
        return sgm_layout(net, sd, dtype, prefix)
    keys, modules = {}, {}
    used = set()
    for m in load_architecture(model).unet.table.modules.values():
        for suffix in (".weight", ".bias"):
            parts = [d + suffix for d in m.diffusers]
            if not all(p in sd for p in parts):
                continue
            shape = (sum(sd[p][0] for p in parts), *sd[parts[0]][1:])
            keys[prefix + m.canonical + suffix] = (shape, dtype)
            used.update(parts)
            if suffix == ".weight":
                modules[m.canonical] = shape
    for k, shape in sd.items():
        if k not in used:
            keys[prefix + k] = (shape, dtype)
    return keys, modules


def sgm_layout(unet, sd, dtype, prefix):
    """A faithful SGM single-file UNet: every parameter under its SGM name, taken from diffusers' own single-file
    converter (``diffusers_oracle.sdxl_sgm_names``), so that sd-mecha's ``sdxl-sgm`` config reads it as is. The LoRA
    targets are lorabox's table entries; their canonical names must be among the SGM names."""
    from tests.oracles.diffusers_oracle import sdxl_sgm_names

    names = sdxl_sgm_names(unet)
    keys = {prefix + names[k]: (shape, dtype) for k, shape in sd.items()}
    modules = {}
    for m in load_architecture("sdxl").unet.table.modules.values():
        if m.diffusers[0] + ".weight" in sd:
            assert len(m.diffusers) == 1 and names[m.diffusers[0] + ".weight"] == m.canonical + ".weight", m
            modules[m.canonical] = sd[m.diffusers[0] + ".weight"]
    return keys, modules


def write_base(path: Path, keys) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal(1 << 22).astype(np.float32) * 0.02
    entries = [(k, dt, shape) for k, (shape, dt) in keys.items()]
    with StreamWriter(path, entries, {"note": "lorabox synthetic benchmark base"}) as w:
        for k, dt, shape in entries:
            n = int(np.prod(shape))
            vals = np.resize(block, n).reshape(shape)
            w.write(k, Tensor.from_values(vals, dt) if dt == "BF16" else Tensor(vals.astype(np.float16), dt))


def write_lora(path: Path, modules, rank: int) -> None:
    rng = np.random.default_rng(1)
    t = {}
    for name, shape in modules.items():
        key = "lora_unet_" + name.replace(".", "_")
        n_in = int(np.prod(shape[1:]))
        down = rng.standard_normal((rank, n_in)).astype(np.float32) * 0.01
        up = rng.standard_normal((shape[0], rank)).astype(np.float32) * 0.01
        t[key + ".lora_down.weight"] = Tensor.from_values(down.reshape(rank, *shape[1:]) if len(shape) == 4 and shape[2] == 1
                                                          else down.reshape((rank, *shape[1:])) if len(shape) == 4 else down, "BF16")
        t[key + ".lora_up.weight"] = Tensor.from_values(up.reshape(shape[0], rank, 1, 1) if len(shape) == 4 else up, "BF16")
        t[key + ".alpha"] = Tensor.scalar(rank / 2)
    write_tensors(path, t)


def write_diffusers_folder(folder: Path) -> None:
    """The SDXL base as a diffusers UNet folder (config + diffusion_pytorch_model.safetensors, diffusers names)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**SDXL)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    rng = np.random.default_rng(0)
    block = rng.standard_normal(1 << 22).astype(np.float32) * 0.02
    entries = [(k, "F16", tuple(v.shape)) for k, v in model.state_dict().items()]
    with StreamWriter(folder / "diffusion_pytorch_model.safetensors", entries, {"format": "pt"}) as w:
        for k, dt, shape in entries:
            w.write(k, Tensor(np.resize(block, int(np.prod(shape))).reshape(shape).astype(np.float16), dt))


def run(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS GiB) of a command: the child's own rusage (os.wait4), so no GNU time is needed."""
    global LAST_CPU, LAST_STDOUT, LAST_MACHINE
    before = machine_cpu()
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(err.read().decode(errors="replace")[-2000:])
        out.seek(0)
        LAST_STDOUT = out.read().decode(errors="replace")
    LAST_CPU = (usage.ru_utime, usage.ru_stime)
    after = machine_cpu()
    LAST_MACHINE = {k: after[k] - before[k] for k in after} if before and after else {}
    return seconds, usage.ru_maxrss / 2**20


LAST_CPU = (0.0, 0.0)  # user and system CPU-s of the last `run`
LAST_STDOUT = ""  # what it printed
LAST_MACHINE: dict = {}  # the whole machine's CPU-s by state over the last `run` (`machine_cpu`)


def machine_cpu() -> dict | None:
    """The machine's CPU-s since boot by state, from Linux's /proc/stat (None elsewhere). "steal" is time the
    hypervisor gave this virtual machine's CPUs to others: on a shared 2-core machine it moves the compute's pace
    from one run to the next."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:9]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"),
                    (int(v) / tick for v in fields)))


def machine() -> str:
    """The last `run`'s machine-wide CPU-s that went to other guests (stolen) and to no one (idle, I/O wait)."""
    m = LAST_MACHINE
    if not m:
        return ""
    return f"; machine: {m['steal']:.0f} stolen, {m['idle'] + m['iowait']:.0f} idle CPU-s"


def stages() -> str:
    """Where the last merge's merging thread spent its time, from its --json report (`MergeReport.stages`)."""
    try:
        report = json.loads(LAST_STDOUT)
    except ValueError:
        return ""
    cached = report.get("base_from_page_cache", 0)
    return ("; " + ", ".join(f"{k} {v:.1f} s" for k, v in report.get("stages", {}).items())
            + (f", {cached / 1e9:.1f} GB of the base from the page cache" if cached else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["sdxl", "flux1"], default="sdxl")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dir", default="/tmp/lorabox-bench")
    ap.add_argument("--keep", action="store_true", default=os.environ.get("KEEP") == "1",
                    help="keep the base and LoRA written in --dir (and the digest cache) for the next run; without "
                         "it the files this run wrote are removed at the end (KEEP=1 also keeps them)")
    ap.add_argument("--rounds", type=int, default=1, help="copy and merge this many times, interleaved, and print "
                    "the median ratios: this disk's speed swings by a third within minutes")
    ap.add_argument("--peer", action="store_true", help="also run diffusers' and sd-mecha's merges (SDXL only)")
    ap.add_argument("--subset", metavar="REGEX", help="keep only the checkpoint keys this regex finds (a quick run)")
    ap.add_argument("--check", action="store_true", help="with --peer: compare sd-mecha's merge with lorabox's")
    ap.add_argument("--dtype", default="keep", help="lorabox merge --dtype (fp8_e4m3fn: stochastic rounding of the "
                    "patched weights, the default for fp8)")
    ap.add_argument("--quant", help="lorabox merge --quant (Q8_0, Q4_K, ...): write GGUF instead, as ComfyUI-GGUF "
                    "lays it out (the denoiser only); overrides --dtype")
    ap.add_argument("--merge-args", default="", help="more lorabox merge options, in one string "
                    "('--fp8-layout comfy_quant --rounding nearest')")
    ap.add_argument("--base-quant", metavar="TYPE", help="merge into a GGUF base of this type (Q8_0, Q4_K, ...), "
                    "keeping its types: the base is written first, by a lorabox merge --quant")
    ap.add_argument("--device", action="append", help="lorabox merge --device (repeatable, one merge each): auto "
                    "(the default: CUDA when present), cpu, cuda")
    ap.add_argument("--io", choices=["direct", "mapped-reads", "buffered"], default="direct", help="direct (the "
                    "default): the output written around the page cache where the filesystem allows, and the base "
                    "too when it is over half the RAM; mapped-reads: the base read through memory maps "
                    "(LORABOX_DIRECT_READS=0); buffered: both through the page cache (LORABOX_DIRECT_IO=0)")
    ap.add_argument("--cold", action="store_true", help="drop the base from the page cache before each copy and "
                    "each merge (posix_fadvise DONTNEED), as for a base not read since the machine started")
    args = ap.parse_args()
    if args.io == "buffered":
        os.environ["LORABOX_DIRECT_IO"] = "0"
    os.environ["LORABOX_DIRECT_READS"] = "0" if args.io == "mapped-reads" else "1"
    d = Path(args.dir)
    made_dir = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    byte_code(d / "pycache")
    keys, modules = layout(args.model)
    if args.subset:
        keys = {k: v for k, v in keys.items() if re.search(args.subset, k)}
        modules = {m: s for m, s in modules.items() if any(re.search(args.subset, m + x) for x in (".weight", ".bias"))}
    base, lora, copy, out = d / f"{args.model}.safetensors", d / "lora.safetensors", d / "copy.safetensors", d / "out.safetensors"
    params = sum(int(np.prod(s)) for s, _ in keys.values())
    t = time.perf_counter()
    scratch = [copy, out, d / "pycache", d / "merged_sdmecha.safetensors", d / "unet", d / "merged_lorabox",
               d / "merged_diffusers", d / "merged_peft"]  # outputs and copies: removed at the end
    made = [lora, d / "cache"]  # removed too unless --keep, with the base if this run wrote it
    if not base.exists():
        write_base(base, keys)
        made.append(base)
    print(f"{args.model}: {len(keys)} tensors, {params / 1e9:.2f} B params, {base.stat().st_size / 1e9:.1f} GB "
          f"(written in {time.perf_counter() - t:.0f} s)")
    write_lora(lora, modules, args.rank)
    print(f"LoRA rank {args.rank} on {len(modules)} weights: {lora.stat().st_size / 1e6:.0f} MB")
    if args.base_quant:  # a GGUF base: the checkpoint above quantized (with the LoRA merged once, it does not matter)
        gguf_base = d / f"{args.model}.{args.base_quant}.gguf"
        if not gguf_base.exists():
            t_base, _ = run([sys.executable, "-m", "lorabox", "merge", str(base), "--lora", f"{lora}:0.8", "-o",
                             str(gguf_base), "--quant", args.base_quant])
            made.append(gguf_base)
            print(f"GGUF base in {args.base_quant}: {gguf_base.stat().st_size / 1e9:.1f} GB "
                  f"(written in {t_base:.0f} s)")
        base, out = gguf_base, d / "out.gguf"
        scratch.append(out)
    devices = args.device or ["auto"]
    ratios: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_ + 1} of {args.rounds}:")
        timings = merge_round(args, base, lora, copy, out, d, devices, ratios)
    if args.rounds > 1:
        print("median ratio to copy over the rounds: " + ", ".join(
            f"{k} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in ratios.items()))
    if not args.check:
        out.unlink()
    if args.peer and args.model == "sdxl":  # against the first (cold) merge
        peer_sdmecha(base, lora, out if args.check else None, d / "merged_sdmecha.safetensors", *timings[0])
    out.unlink(missing_ok=True)
    if args.peer and args.model == "sdxl" and not args.subset:
        peer_diffusers(d, lora)
    for p in scratch + ([] if args.keep else made):  # only what this run wrote: --dir may hold other files
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if not args.keep and made_dir and not any(d.iterdir()):
        d.rmdir()


def byte_code(cache: Path) -> None:
    """Where Python is told to write no byte code (PYTHONDONTWRITEBYTECODE, as the GPU machines' image sets) and the
    installed packages hold none, every merge compiles torch's modules again: 3 s of a merge's main thread on the
    H100 machine. An installed lorabox does not pay that (pip writes the byte code), so the merges timed here get a
    byte-code cache, filled once before the first."""
    if not sys.flags.dont_write_bytecode:
        return
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    subprocess.run([sys.executable, "-c", "import torch, lorabox.cli, lorabox.merge.engine, lorabox.merge.compute\n"
                    "try:\n    import llvmlite.binding, lorabox.merge._certified_numba\nexcept ImportError:\n    pass"],
                   check=True, cwd=ROOT)
    print(f"byte code: this Python writes none (PYTHONDONTWRITEBYTECODE); the merges read theirs from {cache}")


def merge_round(args, base: Path, lora: Path, copy: Path, out: Path, d: Path, devices: list[str],
                ratios: dict[str, list[float]]) -> list[tuple[float, float]]:
    """`cp` + `sync` of the base, then a merge per device with the base hashed, then one more with its digest
    remembered; each ratio is to this round's copy. Returns (seconds, peak RSS GiB) of the merges."""
    out.unlink(missing_ok=True)  # the last round's output: room for the copy
    if args.cold:
        drop_cached(base)
    try:
        t_copy, _ = run(["sh", "-c", f"cp {base} {copy} && sync {copy}"])
    finally:
        copy.unlink(missing_ok=True)
    print(f"plain copy (cp + sync{', base dropped from the page cache' if args.cold else ''}): {t_copy:.1f} s{machine()}")
    os.environ["LORABOX_CACHE_DIR"] = str(d / "cache")  # cold: the first merge hashes the base (a kept --dir
    (d / "cache" / "sha256.json").unlink(missing_ok=True)  # remembers it); the compiled loop stays, as for any user
    timings = []
    for device in [*devices, "again"]:
        out.unlink(missing_ok=True)  # room for this merge's output
        label = f"--device {device}"
        if device == "again":  # the everyday case of another LoRA on the same base: its digest is remembered
            device, label = devices[0], "again"
            print("again, the base's sha256 remembered from the first merge:", end=" ")
        output = (["--quant", args.quant] if args.quant else ["--dtype", args.dtype]) + shlex.split(args.merge_args)
        if args.cold:
            drop_cached(base)
        t_merge, rss = run([sys.executable, "-m", "lorabox", "merge", str(base), "--lora", f"{lora}:0.8", "-o",
                            str(out), "--overwrite", "--json", "--device", device, *output])
        timings.append((t_merge, rss))
        ratios.setdefault(label, []).append(t_merge / t_copy)
        print(f"lorabox merge (--device {device} {' '.join(output)}, {args.io} I/O): {t_merge:.1f} s "
              f"({LAST_CPU[0]:.1f} user + {LAST_CPU[1]:.1f} system CPU-s), peak RSS {rss:.2f} GiB, "
              f"ratio to copy {t_merge / t_copy:.2f}{stages()}{machine()}")
    return timings


def drop_cached(path: Path) -> None:
    """Ask the kernel to drop `path`'s pages from the page cache (clean pages go; a no-op where unsupported)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peer_sdmecha(base: Path, lora: Path, lorabox_out: Path | None, out: Path, t_lb: float, rss_lb: float) -> None:
    """sd-mecha (scripts/peer_sdmecha_merge.py) on the same single file, LoRA and ratio as the lorabox run above;
    with `lorabox_out`, its output is compared with lorabox's (after the timing)."""
    t_peer, rss_peer = run([sys.executable, str(ROOT / "scripts" / "peer_sdmecha_merge.py"), str(base), str(lora), "0.8",
                            str(out)])
    print(f"single file: lorabox merge {t_lb:.1f} s ({rss_lb:.2f} GiB), sd-mecha add_difference+merge (float32, "
          f"fp16 out) {t_peer:.1f} s ({rss_peer:.2f} GiB): ratio lorabox/sd-mecha {t_lb / t_peer:.2f}")
    if lorabox_out is not None:
        agreement("sd-mecha", out, lorabox_out)
    out.unlink()


def agreement(name: str, peer_out: Path, lorabox_out: Path) -> None:
    """Print how far a peer's merged weights are from lorabox's (untimed). The comparison maps both files, so it runs
    in a process of its own: on Linux a child's peak RSS (`run`, `wait4`) starts from its parent's peak at the fork,
    and a comparison in this process had raised the peaks reported for every merge after it to 10 GiB."""
    code = ("import json, sys; from scripts.peer_sdmecha_merge import compare; "
            "print(json.dumps(compare(sys.argv[1], sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(peer_out), str(lorabox_out)], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    r = json.loads(done.stdout.splitlines()[-1])
    print(f"{name} vs lorabox: {r['common']} common tensors, bit-identical {r['identical'] / r['elements']:.6f}, "
          f"max abs diff {r['max_abs_diff']:.3g}, only in one: {len(r['only_peer']) + len(r['only_lorabox'])}")


def peer_diffusers(d: Path, lora: Path) -> None:
    """diffusers (scripts/peer_diffusers_merge.py: fuse_lora), PEFT (scripts/peer_peft_merge.py: merge_and_unload) and
    lorabox on the base as a diffusers UNet folder; then how far each peer's weights are from lorabox's (untimed)."""
    folder = d / "unet"
    write_diffusers_folder(folder)
    t_lb, rss_lb = run([sys.executable, "-m", "lorabox", "merge", str(folder), "--lora", f"{lora}:0.8",
                        "-o", str(d / "merged_lorabox"), "--overwrite", "--json"])
    weights = "diffusion_pytorch_model.safetensors"
    for name, script, what in (("diffusers", "peer_diffusers_merge.py", "load+fuse_lora+save"),
                               ("PEFT", "peer_peft_merge.py", "LoraModel+merge_and_unload+save")):
        out = d / f"merged_{name.lower()}"
        t_peer, rss_peer = run([sys.executable, str(ROOT / "scripts" / script), str(folder), str(lora), "0.8",
                                str(out)])
        print(f"diffusers UNet folder: lorabox merge {t_lb:.1f} s ({rss_lb:.2f} GiB), {name} {what} {t_peer:.1f} s "
              f"({rss_peer:.2f} GiB): ratio lorabox/{name} {t_lb / t_peer:.2f}")
        agreement(name, out / weights, d / "merged_lorabox" / weights)
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
