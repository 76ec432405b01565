"""Training data: a folder of images with same-named .txt captions, aspect-ratio buckets, and an on-disk cache.

Scanning never loads a model: it opens every image (corrupt or too small ones are skipped and reported), reads its
caption (trigger prepended) and picks its bucket. Latents and text embeddings are computed once and cached under
`cache_dir`, keyed by the image file's sha256 (or the caption text), the base (its configs) and the bucket size, so a
second run, a resumed run or a run with other hyperparameters reuses them. Latents are the VAE posterior's mean.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..io.digests import file_sha256

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Item:
    image: Path
    caption: str
    size: tuple[int, int]  # the image's (width, height)
    digest: str  # sha256 of the file
    plain_caption: str = ""  # the caption as written, without the trigger
    bucket: tuple[int, int] | None = None  # the (width, height) it is trained at (assign_buckets)


@dataclass
class Dataset:
    items: list[Item]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        out: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            out.setdefault(item.bucket, []).append(i)
        return out


def bucket_sizes(resolution: int, multiple: int, *, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `multiple`, area at most resolution^2, aspect up to max_ratio."""
    out = set()
    area = resolution * resolution
    w = multiple
    while w <= resolution * max_ratio:
        h = (area // w) // multiple * multiple
        if h >= multiple and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += multiple
    out.add((resolution // multiple * multiple,) * 2)
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest in log scale (then the larger one)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def scan(folder: str | Path, *, trigger: str | None = None, min_side: int = 0) -> Dataset:
    """Find the images and captions of `folder`; skip (and report) corrupt and too-small images.

    Raises DataError for a missing or empty folder, images without captions, or nothing left to train on.
    """
    from PIL import Image, ImageOps

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder.", hint="Give a folder of images with same-named .txt captions.")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}).",
                        hint="Put the training images and a same-named .txt caption for each in this folder.")
    uncaptioned = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        listed = ", ".join(uncaptioned[:5]) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else "")
        raise DataError(f"{folder}: {len(uncaptioned)} of {len(images)} images have no caption: {listed}.",
                        hint="Write a same-named .txt file beside each image (e.g. photo.png -> photo.txt).")
    items, skipped = [], []
    for path in images:
        try:
            with Image.open(path) as im:
                im.load()  # decode the whole file: a truncated image fails here, not during training
                size = ImageOps.exif_transpose(im).size
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad file
            skipped.append((path.name, f"cannot be decoded ({type(exc).__name__}: {exc})"))
            continue
        if min(size) < min_side:
            skipped.append((path.name, f"too small ({size[0]}x{size[1]}; the shorter side must be >= {min_side})"))
            continue
        plain = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        caption = (f"{trigger}, {plain}" if plain else trigger) if trigger else plain
        items.append(Item(path, caption, size, file_sha256(path), plain))
    if not items:
        raise DataError(f"{folder}: no usable image: " + "; ".join(f"{n} {why}" for n, why in skipped) + ".",
                        hint="Replace the images listed.")
    return Dataset(items, skipped)


def assign_buckets(dataset: Dataset, resolution: int, multiple: int) -> None:
    """Give every image the bucket nearest its aspect ratio (sides multiples of what the base needs)."""
    sizes = bucket_sizes(resolution, multiple)
    for item in dataset.items:
        item.bucket = nearest_bucket(item.size, sizes)


def load_pixels(item: Item):
    """The image resized to cover its bucket, centre-cropped, as a (3, H, W) float tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    bw, bh = item.bucket
    with Image.open(item.image) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")  # phone photos: upright as viewers show them
        scale = max(bw / im.width, bh / im.height)
        w, h = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.LANCZOS)
        left, top = (w - bw) // 2, (h - bh) // 2
        im = im.crop((left, top, left + bw, top + bh))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# --- the cache ---------------------------------------------------------------------------------------------

class Cache:
    """Tensors on disk under `root/<kind>/<key>.safetensors`, written atomically."""

    def __init__(self, root: str | Path, base_id: str):
        self.root = Path(root)
        self.base_id = base_id
        self.hits = 0
        self.misses = 0

    def latent_key(self, item: Item) -> str:
        return _key(item.digest, self.base_id, f"{item.bucket[0]}x{item.bucket[1]}")

    def text_key(self, caption: str, max_sequence_length) -> str:
        return _key(hashlib.sha256(caption.encode()).hexdigest(), self.base_id, str(max_sequence_length))

    def get(self, kind: str, key: str):
        from safetensors.torch import load_file

        path = self.root / kind / f"{key}.safetensors"
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return load_file(path)

    def put(self, kind: str, key: str, tensors: dict) -> None:
        from safetensors.torch import save

        from ..io.files import commit, discard, temporary_beside

        path = self.root / kind / f"{key}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path)
        try:
            tmp.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
            commit(tmp, path)
        except BaseException:
            discard(tmp)
            raise


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
