"""The checks: small functions in a registry, each emitting findings with ids from findings.CATALOG.

`check_file` reads the header first (container checks need nothing else), memory-maps the tensors, detects
the architecture, resolves every key against its table (the lorabox key maps: no second naming model here),
then runs the registered checks in order. Tensor values are read one tensor at a time; a check never loads
the LoRA as a whole. Library code: it never prints and never raises for a bad file (a bad file is findings).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..dialects import ParsedKey, parse_key
from ..errors import InputFileError, LoraboxError, NotALoraError, UnknownArchitecture
from ..keymap import Architecture, load_architecture
from ..tensor import Tensor
from .findings import CATALOG, ERROR, FileReport, Finding, grade_of

PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
# read_header's messages, mapped to the container id they mean (first match wins)
CONTAINER_IDS = (("pickle", "container.pickle"), ("truncated", "container.truncated"),
                 ("no such file", "container.missing"), ("is a directory", "container.missing"))
FACTOR_ROLES = ("down", "up", "mid", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ALPHA_SUFFIXES = (".lora_down.weight", ".hada_w1_a", ".lokr_w1_b", ".lokr_w2_b")  # spellings that carry .alpha
FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
SHOWN_KEYS = 6  # keys named in a message; the finding's `keys` lists them all
EXTRA_BYTES = 1 << 20  # tensor bytes beyond the down/up pairs worth a warning
# metadata that libraries write from the tensors (module names, ranks): nothing private, and large to scan
MACHINE_WRITTEN = ("lora_adapter_metadata", "lorabox.folded_alpha")


@dataclass
class Base:
    """A base checkpoint identified once per process: its architecture, layout and variant."""

    path: str
    checkpoint: object
    architecture: str
    layout: str
    variant: str | None


@dataclass
class Context:
    path: Path
    target: str | None
    base: Base | None
    report: FileReport
    header: dict = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0
    tensors: dict[str, Tensor] = field(default_factory=dict)
    arch: Architecture | None = None
    parsed: dict[str, ParsedKey] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    slots: dict[tuple, dict[str, str]] = field(default_factory=dict)  # (component, module, part, naming) -> role -> key
    _lora: object = None

    @property
    def lora(self):
        """The canonical Lora (lorabox.lora), read on first use and only for a structurally sound file; else None."""
        if self._lora is None and not self.report.failed() and self.parsed:
            from ..dialects import read_state_dict

            try:
                self._lora = read_state_dict(self.tensors, self.arch, self.metadata, drop_unknown=True,
                                             source=str(self.path))
            except LoraboxError:
                self._lora = False  # the structure checks already say why
        return self._lora or None

    def add(self, finding_id: str, message: str, keys=(), remedy: str | None = None) -> None:
        keys = sorted(keys)
        self.report.findings.append(Finding(finding_id, grade_of(finding_id, self.target), str(self.path), message,
                                            CATALOG[finding_id][1] if remedy is None else remedy, keys))

    def stop(self) -> bool:
        return self.report.unusable


def _shown(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


# --- registry ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    name: str
    ids: tuple[str, ...]
    fn: Callable[[Context], None]
    late: bool  # runs after every structure check; may read the canonical model (ctx.lora)


CHECKS: list[Check] = []


def check(*ids: str, late: bool = False):
    """Register a check function that may emit `ids` (all must be in the catalog)."""
    def register(fn):
        unknown = [i for i in ids if i not in CATALOG]
        assert not unknown, f"{fn.__name__}: ids not in CATALOG: {unknown}"
        CHECKS.append(Check(fn.__name__, ids, fn, late))
        return fn
    return register


# --- container and keys (always run first, in this order) --------------------------------------------------

def read_container(ctx: Context) -> None:
    """Header first: a pickle or a broken header stops here, before any tensor byte is read."""
    from ..io.safetensors import read_header

    try:
        with open(ctx.path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        ctx.add("container.missing", f"cannot read the file ({exc.strerror or exc}).")
        return
    if head[8:9] != b"{" and head.startswith(PICKLE_MAGIC):
        ctx.add("container.pickle", "a pickle (torch .ckpt/.pt/.bin) file: loading it can run arbitrary code.")
        return
    try:
        ctx.header, ctx.metadata, ctx.data_start = read_header(ctx.path)
    except InputFileError as exc:
        message = exc.message.removeprefix(f"{ctx.path}: ")
        finding = next((i for word, i in CONTAINER_IDS if word in message), "container.header")
        ctx.add(finding, message)
        return
    if not ctx.header:
        ctx.add("container.empty", "the file holds no tensors.")
        return
    ctx.tensors = _mapped(ctx.path, ctx.header, ctx.data_start)


def _mapped(path: Path, header: dict, data_start: int) -> dict[str, Tensor]:
    """The tensors of an already validated header, memory-mapped: no byte is read until a check asks for values."""
    import mmap

    from ..tensor import storage_dtype

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = {}
    for name, entry in header.items():
        dtype = storage_dtype(entry["dtype"])
        begin, stop = entry["data_offsets"]
        arr = np.frombuffer(buf, dtype=dtype, count=(stop - begin) // dtype.itemsize, offset=data_start + begin)
        out[name] = Tensor(arr.reshape(entry["shape"]), entry["dtype"])
    return out


def resolve_keys(ctx: Context, arch_name: str | None = None) -> None:
    from ..detect import detect_architecture

    try:
        name = arch_name or detect_architecture(ctx.tensors, ctx.metadata, source=str(ctx.path))
    except NotALoraError as exc:
        ctx.add("container.not_lora", exc.message.removeprefix(f"{ctx.path}: "))
        return
    except UnknownArchitecture as exc:
        ctx.add("arch.unknown", exc.message.removeprefix(f"{ctx.path}: "))
        return
    ctx.arch = load_architecture(name)
    ctx.report.architecture = name
    for key in ctx.tensors:
        p = parse_key(key, ctx.arch)
        if p is None:
            ctx.unknown.append(key)
            continue
        ctx.parsed[key] = p
        slot = (p.component, p.hit.module.canonical, p.hit.part, p.hit.naming)
        ctx.slots.setdefault(slot, {})[p.role] = key  # a second key for one role is found by `duplicates`


# --- structure ---------------------------------------------------------------------------------------------

@check("keys.unknown")
def unknown_keys(ctx: Context) -> None:
    if ctx.unknown:
        ctx.add("keys.unknown", f"{len(ctx.unknown)} of {len(ctx.tensors)} keys name nothing in {ctx.arch.title}: "
                f"{_shown(ctx.unknown)}.", ctx.unknown)


@check("keys.duplicate")
def duplicates(ctx: Context) -> None:
    seen: dict[tuple, list[str]] = {}
    for key, p in ctx.parsed.items():
        seen.setdefault((p.component, p.hit.module.canonical, p.hit.part, p.role), []).append(key)
    dups = [keys for keys in seen.values() if len(keys) > 1]
    if dups:
        keys = [k for group in dups for k in group]
        ctx.add("keys.duplicate", f"{len(dups)} tensor(s) are spelled twice: {_shown(keys)}.", keys)


@check("dialect.mixed")
def one_dialect(ctx: Context) -> None:
    from ..dialects import _spelling_name

    families: dict[str, list[str]] = {}
    for key, p in ctx.parsed.items():
        families.setdefault(_spelling_name(p), []).append(key)
    # kohya's text encoders say "kohya" where its denoiser says "kohya (original names)": one dialect
    names = [n for n in families if not any(m != n and m.startswith(n + " (") for m in families)]
    ctx.report.dialect = ", ".join(sorted(names, key=lambda n: -len(families[n])))
    if len(names) > 1:
        minority = sorted(names, key=lambda n: len(families[n]))[:-1]
        keys = [k for n in minority for k in families[n]]
        counts = ", ".join(f"{n} ({len(families[n])} keys)" for n in sorted(names, key=lambda n: -len(families[n])))
        ctx.add("dialect.mixed", f"keys in {len(names)} dialects: {counts}.", keys)


@check("pairs.unpaired", "pairs.rank_mismatch", "pairs.shape", "pairs.mixed_ranks")
def pairs(ctx: Context) -> None:
    unpaired, mismatched, bad_shape, ranks = [], [], [], Counter()
    for roles in ctx.slots.values():
        down, up = roles.get("down"), roles.get("up")
        if (down is None) != (up is None):
            unpaired.append(down or up)
            continue
        if down is None:
            continue
        d, u = ctx.tensors[down].shape, ctx.tensors[up].shape
        if len(d) not in (2, 4) or len(u) not in (2, 4) or len(d) != len(u) or (len(u) == 4 and "mid" not in roles
                                                                               and u[2:] != (1, 1)):
            bad_shape += [down, up]
        elif u[1] != d[0]:
            mismatched += [down, up]
        else:
            ranks[d[0]] += 1
    if unpaired:
        ctx.add("pairs.unpaired", f"{len(unpaired)} factor(s) without their partner: {_shown(unpaired)}.", unpaired)
    if mismatched:
        ctx.add("pairs.rank_mismatch", f"{len(mismatched) // 2} module(s) whose up and down disagree on the rank: "
                f"{_shown(mismatched)}.", mismatched)
    if bad_shape:
        ctx.add("pairs.shape", f"{len(bad_shape) // 2} module(s) with factor shapes no loader accepts: {_shown(bad_shape)}.",
                bad_shape)
    if len(ranks) > 1:
        ctx.add("pairs.mixed_ranks", "ranks differ per module: " + ", ".join(f"{r} x{n}" for r, n in sorted(ranks.items()))
                + ".")


@check("dtype.fp8", "dtype.fp32", "dtype.mixed", "dtype.non_float")
def dtypes(ctx: Context) -> None:
    factors = {k: ctx.tensors[k].dtype for k, p in ctx.parsed.items() if p.role in FACTOR_ROLES}
    counts = Counter(factors.values())
    non_float = [k for k, d in factors.items() if d not in FLOATS]
    if non_float:
        ctx.add("dtype.non_float", f"{len(non_float)} factor(s) are not floating point: {_shown(non_float)}.", non_float)
    fp8 = [k for k, d in factors.items() if d.startswith("F8")]
    if fp8:
        ctx.add("dtype.fp8", f"{len(fp8)} of {len(factors)} factors are fp8 ({', '.join(sorted({factors[k] for k in fp8}))}).",
                fp8)
    if counts and set(counts) == {"F32"}:
        ctx.add("dtype.fp32", f"all {len(factors)} factors are fp32.")
    if len(counts) > 1:
        ctx.add("dtype.mixed", "factor dtypes: " + ", ".join(f"{d} x{n}" for d, n in counts.most_common()) + ".")


# --- values, streamed one tensor at a time ------------------------------------------------------------------

def _nonfinite(t: Tensor) -> bool:
    if t.dtype in ("F32", "F16", "BF16"):
        return not np.isfinite(t.values32()).all()
    if t.dtype in ("F64", "F8_E4M3", "F8_E5M2"):
        return not np.isfinite(t.values()).all()
    return False


@check("tensors.nonfinite")
def nonfinite(ctx: Context) -> None:
    bad = [k for k in ctx.parsed if ctx.tensors[k].dtype in FLOATS and _nonfinite(ctx.tensors[k])]
    if bad:
        ctx.add("tensors.nonfinite", f"{len(bad)} tensor(s) hold NaN or Inf: {_shown(bad)}.", bad)


@check("tensors.zero_up", "tensors.all_zero")
def dead_modules(ctx: Context) -> None:
    ups = [roles["up"] for roles in ctx.slots.values() if "up" in roles and "down" in roles]
    zero = [k for k in ups if ctx.tensors[k].dtype in FLOATS and not ctx.tensors[k].nonzero().any()]
    if ups and len(zero) == len(ups):
        ctx.add("tensors.all_zero", f"all {len(ups)} up (lora_B) tensors are zero: the LoRA changes nothing.", zero)
    elif zero:
        ctx.add("tensors.zero_up", f"{len(zero)} of {len(ups)} modules have an all-zero up (lora_B): {_shown(zero)}.", zero)


@check("alpha.missing", "alpha.zero", "alpha.negative", "alpha.stray")
def alphas(ctx: Context) -> None:
    missing, zero, negative, stray = [], [], [], []
    for roles in ctx.slots.values():
        factor = next((roles[r] for r in ("down", "hada_w1_a", "lokr_w1_b", "lokr_w2_b") if r in roles), None)
        alpha = roles.get("alpha")
        if alpha is None:
            if factor is not None and factor.endswith(ALPHA_SUFFIXES):
                missing.append(factor)
            continue
        if factor is None and not any(r in roles for r in FACTOR_ROLES):
            stray.append(alpha)
            continue
        t = ctx.tensors[alpha]
        if t.dtype not in FLOATS or t.array.size != 1:
            continue
        value = float(t.values().reshape(-1)[0])
        if value == 0:
            zero.append(alpha)
        elif value < 0:
            negative.append(alpha)
    if missing:
        ctx.add("alpha.missing", f"{len(missing)} module(s) spelled with lora_down/lora_up have no .alpha (scale 1): "
                f"{_shown(missing)}.", missing)
    if zero:
        ctx.add("alpha.zero", f"{len(zero)} alpha(s) are 0: ComfyUI disables these modules, kohya uses alpha = rank: "
                f"{_shown(zero)}.", zero)
    if negative:
        ctx.add("alpha.negative", f"{len(negative)} alpha(s) are negative: {_shown(negative)}.", negative)
    if stray:
        ctx.add("alpha.stray", f"{len(stray)} .alpha key(s) without factors (kohya writes these for skipped layers).",
                stray)


# --- after the structure: checks that may read the canonical model -----------------------------------------

@check("alpha.metadata_only", late=True)
def peft_alpha_portability(ctx: Context) -> None:
    """A PEFT file whose lora_adapter_metadata sets alpha != r: only diffusers applies it."""
    from ..dialects import PEFT_METADATA_KEY, _json

    config = _json(ctx.metadata.get(PEFT_METADATA_KEY)) or {}
    alphas = {k: v for k, v in config.items() if k.endswith((".lora_alpha", ".alpha_pattern", ".use_rslora")) and v}
    if all(k.endswith(".lora_alpha") and v == config.get(k[:-len("lora_alpha")] + "r") for k, v in alphas.items()):
        return  # no metadata, or alpha = r everywhere: every runtime agrees (scale 1)
    if any(p.role == "alpha" for p in ctx.parsed.values()) or ctx.lora is None:
        return
    scaled = [a for a in ctx.lora.adapters.values() if a.alpha is not None and a.alpha_value != a.rank]
    if scaled:
        names = [f"{a.component}:{a.module}" for a in scaled]
        ctx.add("alpha.metadata_only", f"lora_adapter_metadata gives {len(scaled)} module(s) alpha != rank "
                f"(e.g. alpha {scaled[0].alpha_value:g}, rank {scaled[0].rank}): only diffusers applies it, ComfyUI and "
                f"kohya load these modules {scaled[0].rank / scaled[0].alpha_value:g}x as strong.", names)


@check("arch.detected", "arch.metadata_mismatch", "arch.nonstandard_width", late=True)
def architecture(ctx: Context) -> None:
    from ..detect import fingerprint, lora_variant, metadata_hint

    variant = lora_variant(ctx.tensors, ctx.metadata, ctx.arch.name)
    ctx.add("arch.detected", f"{ctx.arch.title}{f' ({variant})' if variant else ''}, {ctx.report.dialect} dialect, "
            f"{len(ctx.slots)} modules from {len(ctx.tensors)} keys.")
    hint = metadata_hint(ctx.metadata)
    if hint and hint != ctx.arch.name:
        said = ctx.metadata.get("modelspec.architecture") or ctx.metadata.get("ss_base_model_version")
        ctx.add("arch.metadata_mismatch", f"the metadata says {said!r} ({hint}), the keys and shapes say {ctx.arch.name}.")
    _, mismatches = fingerprint(ctx.arch.name, ctx.tensors)
    if mismatches:
        keys = [m.split(":", 1)[0] for m in mismatches]
        ctx.add("arch.nonstandard_width", f"{len(mismatches)} width(s) differ from the published model: {mismatches[0]}.",
                keys)


@check("arch.base_mismatch", "arch.variant_mismatch", "coverage.base_missing", late=True)
def against_base(ctx: Context) -> None:
    if ctx.base is None:
        return
    from ..detect import lora_variant

    base = ctx.base
    if base.architecture != ctx.arch.name:
        title = load_architecture(base.architecture).title
        ctx.add("arch.base_mismatch", f"the LoRA is for {ctx.arch.title}, the base {base.path} is {title}.")
        return
    variant = lora_variant(ctx.tensors, ctx.metadata, ctx.arch.name)
    if variant and base.variant and variant != base.variant:
        ctx.add("arch.variant_mismatch", f"the LoRA is for {variant}, the base {base.path} is {base.variant}.")
        return
    if ctx.lora is None:
        return
    from ..merge.plan import make_plan

    # where the LoRA's modules land; the sizes are not compared (check's bases may be layouts of any size)
    plan = make_plan(base.checkpoint, [(ctx.lora, 1.0)], arch=base.architecture, drop_unknown=True,
                     check_shapes=False)
    # a component the layout does not map (SDXL's OpenCLIP text encoder in a single file) is not the LoRA's fault
    mapped = ctx.arch.layouts.get(base.layout, {})
    lost = [name for name in plan.dropped if name.split(":", 1)[0] in mapped]
    if lost:
        ctx.add("coverage.base_missing", f"{len(lost)} adapter(s) land on no weight of {base.path} "
                f"({base.layout} layout): {_shown(lost)}.", lost)


@check("coverage.diffusers_drops", "coverage.diffusers_refuses", "coverage.comfyui_drops", "coverage.kohya_drops",
       "coverage.unmodelled", late=True)
def runtime_coverage(ctx: Context) -> None:
    from .runtimes import RUNTIME_VERSIONS, coverage, wheres

    unmodelled = {}
    where = wheres(ctx.arch, ctx.parsed)
    # sd-scripts is a trainer, not where LoRAs are used, and its rules are not run against it: only on request
    for runtime in ("diffusers", "comfyui") + (("kohya",) if ctx.target == "kohya" else ()):
        cov = coverage(runtime, ctx.arch, ctx.parsed, where)
        who = RUNTIME_VERSIONS[runtime]
        if cov.refused:
            ctx.add("coverage.diffusers_refuses", f"{who} refuses the whole file: {cov.refused}.", cov.dropped_keys)
        elif cov.dropped:
            why = "; ".join(f"{len(keys)} because {reason}" for reason, keys in cov.dropped.items())
            ctx.add(f"coverage.{runtime}_drops", f"{who} drops {len(cov.dropped_keys)} of {len(ctx.parsed)} keys: {why}.",
                    cov.dropped_keys)
        if cov.unmodelled:
            unmodelled[runtime] = cov.unmodelled
    if unmodelled:
        ctx.add("coverage.unmodelled", "not modelled: " + ", ".join(f"{len(v)} keys for {r}" for r, v in unmodelled.items())
                + ".", sorted({k for v in unmodelled.values() for k in v}))


@check("container.trailing_bytes", "size.summary", "size.extra_tensors", late=True)
def size(ctx: Context) -> None:
    file_size = ctx.path.stat().st_size
    used = max((e["data_offsets"][1] for e in ctx.header.values()), default=0)
    slack = file_size - ctx.data_start - used
    if slack > 0:
        ctx.add("container.trailing_bytes", f"{slack} byte(s) after the last tensor.")
    predicted = 0
    for roles in ctx.slots.values():
        if "down" in roles and "up" in roles:
            d, u = ctx.tensors[roles["down"]], ctx.tensors[roles["up"]]
            predicted += d.nbytes + u.nbytes
    total = sum(t.nbytes for t in ctx.tensors.values())
    share = f"; {100 * predicted / total:.0f}% of the tensor bytes are down/up pairs" if total else ""
    ctx.add("size.summary", f"{file_size / 2**20:.2f} MiB, header {ctx.data_start - 8} bytes{share}.")
    extra = total - predicted
    if extra > max(EXTRA_BYTES, total // 2):
        big = sorted((k for k, t in ctx.tensors.items() if t.ndim >= 2 and k in ctx.parsed
                      and ctx.parsed[k].role not in ("down", "up")), key=lambda k: -ctx.tensors[k].nbytes)
        ctx.add("size.extra_tensors", f"{extra / 2**20:.1f} MiB ({100 * extra / total:.0f}%) are not rank-r factors "
                f"(full deltas, LoHa/LoKr, unknown keys): more than rank and targets predict.", big)


@check("meta.modelspec", "meta.kohya", "meta.trigger", "meta.private", late=True)
def metadata(ctx: Context) -> None:
    from ..publish.meta import MODELSPEC_MUST
    from ..publish.privacy import find_private

    m = ctx.metadata
    missing = [k for k in MODELSPEC_MUST if not m.get(k)]
    if missing:
        ctx.add("meta.modelspec", f"modelspec fields missing: {', '.join(missing)}.")
    if (ctx.report.dialect or "").startswith("kohya"):
        ss = [k for k in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version") if k not in m]
        if ss:
            ctx.add("meta.kohya", f"kohya training metadata missing: {', '.join(ss)}.")
    if not m.get("modelspec.trigger_phrase") and not m.get("ss_tag_frequency"):
        ctx.add("meta.trigger", "no trigger phrase (modelspec.trigger_phrase) and no ss_tag_frequency to mine one from.")
    private = find_private({k: v for k, v in m.items() if k not in MACHINE_WRITTEN})
    if private:
        shown = "; ".join(f"{i.key}: {i.reason}" for i in private[:SHOWN_KEYS])
        ctx.add("meta.private", f"{len(private)} private detail(s) in the metadata: {shown}.",
                sorted({i.key for i in private}))


@check("meta.hashes", late=True)
def hashes(ctx: Context) -> None:
    """Publishing targets only: hashing reads every byte, which a folder of thousands does not need."""
    if ctx.target not in ("civitai", "hf"):
        return
    from ..publish.hashes import file_hashes

    h = file_hashes(ctx.path)
    ctx.add("meta.hashes", " ".join(f"{k}={v}" for k, v in h.items() if v and k in ("sha256", "autov2", "autov3", "crc32")))


# --- entry point --------------------------------------------------------------------------------------------

def check_file(path: str | os.PathLike, *, base: Base | None = None, target: str | None = None,
               arch: str | None = None) -> FileReport:
    """Run every check on one file; never raises for a bad file (a bad file is findings).

    Example:
        >>> report = check_file("lora.safetensors", target="comfyui")
        >>> report.exit_code(), [f.id for f in report.findings if f.grade == "error"]
    """
    ctx = Context(Path(path), target, base, FileReport(str(path)))
    read_container(ctx)
    if ctx.stop():
        return ctx.report
    resolve_keys(ctx, arch)
    if ctx.stop():
        return ctx.report
    for late in (False, True):
        for c in CHECKS:
            if c.late == late:
                _run(c, ctx)
    return ctx.report


def _run(c: Check, ctx: Context) -> None:
    """One check; a crash is a finding of this file (a folder of thousands goes on), never a lost run."""
    try:
        c.fn(ctx)
    except Exception as exc:  # noqa: BLE001 - reported as a finding with the check's name
        ctx.add("check.crashed", f"the {c.name} check failed: {type(exc).__name__}: {exc}.")
