"""The canonical in-memory LoRA: adapters aimed at canonical weights (or row slices of them).

No I/O and no naming here. An `Adapter` holds its tensors under canonical roles and in canonical layout
(e.g. adaLN rows in BFL's shift/scale order); dialects translate spellings and layouts on the way in and out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .tensor import Tensor

LORA_ROLES = ("down", "up", "mid")
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
EXTRA_ROLES = ("dora_scale", "magnitude", "diff", "diff_b")
# roles whose first axis is the weight's output rows: they follow row slicing and row transforms
ROW_ROLES = ("up", "diff", "diff_b", "magnitude")


@dataclass
class Adapter:
    """One adapter: factors aimed at `module` of `component` (or at part `part` of its row slices).

    `alpha` is the tensor as stored (kept for bit-exact round trips); None means "no alpha", i.e. scale 1.
    """

    component: str
    module: str
    part: int | None = None
    tensors: dict[str, Tensor] = field(default_factory=dict)
    alpha: Tensor | None = None

    @property
    def kind(self) -> str:
        roles = self.tensors.keys()
        if "down" in roles or "up" in roles:
            return "lora"
        if any(r in roles for r in LOHA_ROLES):
            return "loha"
        if any(r in roles for r in LOKR_ROLES):
            return "lokr"
        return "full"  # only diff / diff_b / magnitude

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if "down" in t:
            return t["down"].shape[0]
        if "hada_w1_b" in t:
            return t["hada_w1_b"].shape[0]
        if "lokr_w1_b" in t:
            return t["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in t:
            return t["lokr_w2_b"].shape[0]
        return None

    @property
    def alpha_value(self) -> float | None:
        return None if self.alpha is None else float(self.alpha.values().reshape(-1)[0])

    @property
    def scale(self) -> float:
        """The factor on the low-rank product: alpha/rank, or 1 without alpha (LoKr: only if decomposed)."""
        if self.alpha is None or self.rank is None:
            return 1.0
        return self.alpha_value / self.rank

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.component, self.module, self.part)

    @property
    def dtype(self) -> str:
        return next(iter(self.tensors.values())).dtype

    def delta_shape(self) -> tuple[int, ...] | None:
        """The shape `delta()` returns, from the factors' shapes alone (nothing is computed); None if no delta."""
        s = {k: v.shape for k, v in self.tensors.items()}
        kind = self.kind
        out = None
        if kind == "lora":
            up, down = s["up"], s["down"]
            n_in = int(np.prod(down[1:], dtype=np.int64))
            if "mid" in s:
                out = (up[0], n_in, *s["mid"][2:])
            else:
                out = (up[0], *down[1:]) if len(down) == 4 else (up[0], n_in)
        elif kind == "loha":
            if "hada_t1" in s:
                out = (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
            else:
                out = (s["hada_w1_a"][0], s["hada_w1_b"][-1])
        elif kind == "lokr":
            w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][-1])
            if "lokr_w2" in s:
                w2 = s["lokr_w2"]
            elif "lokr_t2" in s:
                w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1], *s["lokr_t2"][2:])
            else:
                w2 = (s["lokr_w2_a"][0], s["lokr_w2_b"][-1])
            w1 = (*w1, *(1,) * (len(w2) - len(w1)))
            out = tuple(a * b for a, b in zip(w1, w2))
        if out is None and "diff" in s:
            out = s["diff"]
        return None if out is None else tuple(int(n) for n in out)

    def delta(self) -> np.ndarray | None:
        """The weight delta this adapter adds (float64), shaped like its rows of the weight; None if none.

        DoRA magnitudes are not part of it: they rescale the patched weight (see merge).
        """
        t = {k: v.values() for k, v in self.tensors.items()}
        kind = self.kind
        out = None
        if kind == "lora":
            down, up = t["down"], t["up"]
            flat_up, flat_down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
            if "mid" in t:  # Tucker: up [out, r], mid [r, r, kh, kw], down [r, in]
                out = np.einsum("ij,jkhw,kl->ilhw", flat_up, t["mid"], flat_down)
            else:
                out = flat_up @ flat_down
                if down.ndim == 4:
                    out = out.reshape(up.shape[0], *down.shape[1:])
            out = out * self.scale
        elif kind == "loha":
            if "hada_t1" in t:
                w1 = np.einsum("ijkl,jr,ip->prkl", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                w2 = np.einsum("ijkl,jr,ip->prkl", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            else:
                w1 = t["hada_w1_a"] @ t["hada_w1_b"]
                w2 = t["hada_w2_a"] @ t["hada_w2_b"]
            out = w1 * w2 * self.scale
        elif kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = np.einsum("ijkl,jr,ip->prkl", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            decomposed = any(k in t for k in ("lokr_w1_b", "lokr_w2_b"))
            out = np.kron(w1, w2) * (self.scale if decomposed else 1.0)
        if "diff" in t:
            out = t["diff"] if out is None else out + t["diff"]
        return out


@dataclass
class Lora:
    """A LoRA file read into the canonical namespace of one architecture."""

    architecture: str
    adapters: dict[tuple[str, str, int | None], Adapter] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    dialect: str = "unknown"  # how the source file spelled its keys (for reports)
    dropped: list[str] = field(default_factory=list)  # keys left out with drop_unknown=True

    def add(self, adapter: Adapter) -> None:
        self.adapters[adapter.key] = adapter

    def by_module(self) -> dict[tuple[str, str], list[Adapter]]:
        out: dict[tuple[str, str], list[Adapter]] = {}
        for a in self.adapters.values():
            out.setdefault((a.component, a.module), []).append(a)
        return out
