"""Shared test helpers: random canonical LoRAs and the effective delta of every targeted weight."""
from __future__ import annotations

import numpy as np

from lorabox.keymap import load_architecture
from lorabox.lora import Adapter, Lora
from lorabox.ops import part_rows
from lorabox.tensor import Tensor

WRITE = ("kohya", "diffusers", "comfyui", "bfl")
ARCHS = ("sd15", "sdxl", "flux1", "flux2", "sd3", "sd35_large")


def rand(rng, shape, dtype="F32"):
    return Tensor.from_values(rng.standard_normal(shape) * 0.1, dtype)


def random_lora(arch_name: str, *, seed=0, rank=4, dtype="BF16", every=1, alpha=2.0, text_encoders=True,
                slices=False) -> Lora:
    """A LoRA on every `every`-th weight of every component, small widths (rows divisible by every split).

    slices=True aims split modules by slice (as a diffusers file would) instead of whole."""
    rng = np.random.default_rng(seed)
    arch = load_architecture(arch_name)
    lora = Lora(arch_name)
    for comp in arch.components.values():
        if comp.name != "unet" and not text_encoders:
            continue
        for i, module in enumerate(comp.table.modules.values()):
            if i % every:
                continue
            n_in = 16
            if module.split and slices:
                for part, p in enumerate(module.split):
                    t = {"down": rand(rng, (rank, n_in), dtype), "up": rand(rng, (6 * p, rank), dtype)}
                    lora.add(Adapter(comp.name, module.canonical, part, t, Tensor.scalar(alpha)))
                continue
            rows = 6 * (sum(module.split) if module.split else 1)
            t = {"down": rand(rng, (rank, n_in), dtype), "up": rand(rng, (rows, rank), dtype)}
            lora.add(Adapter(comp.name, module.canonical, None, t, Tensor.scalar(alpha)))
    return lora


def effective_deltas(lora: Lora) -> dict[tuple[str, str], np.ndarray]:
    """(component, canonical module) -> the float64 delta of the whole weight, slices assembled."""
    arch = load_architecture(lora.architecture)
    out = {}
    for (comp, name), adapters in lora.by_module().items():
        module = arch.components[comp].table.modules[name]
        if len(adapters) == 1 and adapters[0].part is None:
            out[(comp, name)] = adapters[0].delta()
            continue
        by_part = {a.part: a for a in adapters}
        rows = part_rows([by_part.get(i) for i in range(module.parts)], module.split, name)
        n_in = adapters[0].tensors["down"].shape[1]
        full = np.zeros((sum(rows), n_in))
        r0 = 0
        for i, n in enumerate(rows):
            if i in by_part:
                full[r0:r0 + n] = by_part[i].delta()
            r0 += n
        out[(comp, name)] = full
    return out


def assert_same_deltas(a: Lora, b: Lora, *, rtol=1e-6, exact=False):
    da, db = effective_deltas(a), effective_deltas(b)
    assert da.keys() == db.keys(), sorted(set(da) ^ set(db))[:5]
    for k in da:
        if exact:
            assert np.array_equal(da[k], db[k]), k
        else:
            scale = max(np.abs(da[k]).max(), 1e-30)
            assert np.abs(da[k] - db[k]).max() <= rtol * scale, (k, np.abs(da[k] - db[k]).max() / scale)


def to_torch(sd):
    """lorabox Tensors -> torch tensors (bf16 bits reinterpreted), for feeding the peers."""
    import torch

    out = {}
    for k, t in sd.items():
        arr = np.array(t.array, order="C")
        if t.dtype == "BF16":
            out[k] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(arr)
    return out


def lora_of_shapes(arch_name: str, shapes: dict[str, tuple[int, ...]], *, rank=1, every=1, seed=0, dtype="BF16",
                   alpha=1.0, slices=False) -> Lora:
    """A denoiser LoRA on every `every`-th module of `shapes` (canonical name -> shape of the whole weight: (rows,
    cols), or (rows, in, kh, kw) for a conv, (rows, in, kt, kh, kw) for a 3D one; e.g. the real full-size widths), so
    that detection and the peers see the shapes a real file has. Small ranks keep it small."""
    rng = np.random.default_rng(seed)
    table = load_architecture(arch_name).unet.table
    lora = Lora(arch_name)
    for i, (name, (rows, *inner)) in enumerate(sorted(shapes.items())):
        if i % every:
            continue
        module = table.modules[name]
        parts = module.split if (slices and module.split) else None
        kernel = (1,) * (len(inner) - 1)  # a conv up is [rows, rank, 1, 1] (3D conv: 1, 1, 1)
        for part, share in enumerate(parts or [1]):
            part_rows = rows * share // sum(parts) if parts else rows
            t = {"down": rand(rng, (rank, *inner), dtype), "up": rand(rng, (part_rows, rank, *kernel), dtype)}
            lora.add(Adapter("unet", name, part if parts else None, t, Tensor.scalar(alpha)))
    return lora


def assert_one_line_error(proc, *needles):
    """A CLI failure: non-zero exit, no traceback, one line `lorabox: error: ...` holding every needle."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lorabox: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def heavy_imports(code: str, modules=("torch", "diffusers", "transformers", "peft", "huggingface_hub")) -> list[str]:
    """Which of `modules` a fresh interpreter has imported after running `code` (the light commands must not
    pay torch's 1.5 s import)."""
    import ast
    import subprocess
    import sys

    probe = code + f"\nimport sys as _s\nprint('HEAVY', [m for m in {tuple(modules)!r} if m in _s.modules])"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY ")]
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr
    return ast.literal_eval(line[-1][len("HEAVY "):])

