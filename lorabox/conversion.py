"""Public entry points for reading and converting LoRA files: dialect -> canonical -> dialect."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .detect import detect_architecture
from .dialects import FOLDED_ALPHA_KEY, PEFT_METADATA_KEY, WRITE_DIALECTS, read_state_dict, write_state_dict
from .io.safetensors import check_output, read_tensors, write_tensors
from .keymap import load_architecture
from .lora import Lora
from .tensor import Tensor


def load_lora(path: str | os.PathLike, *, arch: str | None = None, drop_unknown: bool = False) -> Lora:
    """Read a LoRA file of any dialect into the canonical model.

    Args:
        path: a .safetensors LoRA.
        arch: force the architecture (`sd15`, `sdxl`, `flux1`); detected from keys and shapes when None.
        drop_unknown: leave out keys no table understands (listed in `Lora.dropped`) instead of raising.
    Returns:
        The canonical `Lora`.
    Example:
        >>> lora = load_lora("my_flux_lora.safetensors")
        >>> lora.architecture, len(lora.adapters)
    """
    tensors, metadata = read_tensors(path)
    return lora_from_state_dict(tensors, metadata, arch=arch, drop_unknown=drop_unknown, source=str(path))


def lora_from_state_dict(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None, *,
                         arch: str | None = None, drop_unknown: bool = False, source: str = "input") -> Lora:
    metadata = metadata or {}
    name = arch or detect_architecture(tensors, metadata, source=source)
    return read_state_dict(tensors, load_architecture(name), metadata, drop_unknown=drop_unknown, source=source)


@dataclass
class ConvertResult:
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    architecture: str
    source_dialect: str
    target: str
    adapters: int
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output: str | None = None

    def report(self) -> dict:
        return {"output": self.output, "architecture": self.architecture, "from": self.source_dialect,
                "to": self.target, "adapters": self.adapters, "keys": len(self.tensors),
                "dropped": self.dropped, "notes": self.notes}


def convert(lora: Lora, to: str) -> ConvertResult:
    """Spell a canonical Lora in the dialect `to` (kohya, diffusers, comfyui or bfl), keeping every delta.

    Metadata is carried over (minus what described the old spelling) with a `lorabox.convert` record.
    """
    arch = load_architecture(lora.architecture)
    tensors, extra_meta, notes = write_state_dict(lora, arch, to)
    # what described the source's spelling does not describe the output
    metadata = {k: v for k, v in lora.metadata.items() if k not in (PEFT_METADATA_KEY, FOLDED_ALPHA_KEY)}
    metadata.setdefault("format", "pt")
    metadata.update(extra_meta)
    metadata["lorabox.convert"] = json.dumps(
        {"from": lora.dialect, "to": to, "architecture": lora.architecture, "lorabox": __version__,
         "dropped": len(lora.dropped)}, sort_keys=True)
    return ConvertResult(tensors, metadata, lora.architecture, lora.dialect, to, len(lora.adapters),
                         list(lora.dropped), notes)


def default_output(src: str | os.PathLike, to: str) -> Path:
    src = Path(src)
    return src.with_name(f"{src.stem}.{to}.safetensors")


def convert_file(src: str | os.PathLike, to: str, out: str | os.PathLike | None = None, *, arch: str | None = None,
                 drop_unknown: bool = False, overwrite: bool = False) -> ConvertResult:
    """Convert the LoRA file `src` to the dialect `to` and write it atomically to `out`.

    Example:
        >>> convert_file("lora_kohya.safetensors", "diffusers", "lora_peft.safetensors").report()
    """
    if to not in WRITE_DIALECTS:
        from .errors import UnsupportedConversion

        raise UnsupportedConversion(f"unknown target dialect {to!r}.", hint=f"Use one of {', '.join(WRITE_DIALECTS)}.")
    out = check_output(out or default_output(src, to), [src], overwrite=overwrite)
    result = convert(load_lora(src, arch=arch, drop_unknown=drop_unknown), to)
    write_tensors(out, result.tensors, result.metadata, durable=False)  # a LoRA is cheap to redo
    result.output = str(out)
    return result
