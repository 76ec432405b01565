"""Base checkpoints as a stream of tensors: one safetensors file, or a diffusers model folder (sharded, with an
index). The engine reads tensors one at a time in file order, each a read-only memory map of its own byte range
released once written, so resident memory stays at the tensors in flight whatever the checkpoint size."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


from ..errors import InputFileError
from ..io.safetensors import read_header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute, in `file`
    nbytes: int


@dataclass
class Shard:
    path: Path
    metadata: dict[str, str]
    tensors: list[TensorInfo] = field(default_factory=list)  # in file order


@dataclass
class BaseCheckpoint:
    path: Path
    shards: list[Shard]
    folder: bool

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {t.name: t for s in self.shards for t in s.tensors}

    @property
    def nbytes(self) -> int:
        return sum(s.path.stat().st_size for s in self.shards)


def open_base(path: str | os.PathLike) -> BaseCheckpoint:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InputFileError(f"{path}: a folder without .safetensors files.",
                                 hint="Give a checkpoint file, or a diffusers model folder (e.g. .../transformer).")
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text()).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            files = [path / n for n in names]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise InputFileError(f"{path}: the index names shards that are missing: {', '.join(missing)}.")
        return BaseCheckpoint(path, [_shard(f) for f in files], True)
    return BaseCheckpoint(path, [_shard(path)], False)


def _shard(path: Path) -> Shard:
    header, metadata, data_start = read_header(path)
    shard = Shard(path, metadata)
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = e["data_offsets"]
        shard.tensors.append(TensorInfo(name, e["dtype"], tuple(e["shape"]), path, data_start + begin, end - begin))
    return shard
