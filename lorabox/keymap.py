"""Loads the key-map tables in key_maps/*.toml and expands them into lookups.

A table lists, per architecture, every weight a LoRA may target: its canonical (original checkpoint) name,
its diffusers name(s), how a canonical weight splits into several diffusers weights, and named row
transforms. Templates are expanded from small integer expressions (`3*l + j + 1`, `range(depth[l])`).
A table may list `[variants.<name>]` (sizes of one model family sharing the names, e.g. FLUX.2 dev / Klein): each
variant overrides `vars` (block counts; a group whose `for` range is empty is absent from it) and `dims`, and the
table itself is expanded with the top-level `vars`, which must span every variant. A table with `extends = "<other>"`
takes every top-level key of the other table that it does not set itself (a size that cannot be a variant because
some module differs, e.g. SD3.5 Large's block 23).
Nothing here knows any particular architecture.
"""
from __future__ import annotations

import ast
import functools
import operator
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KeyMapError, UnknownArchitecture

DIALECT_SPELLINGS = ("kohya", "diffusers", "comfyui")


def key_maps_dir() -> Path:
    """The tables: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "key_maps", here.parent / "key_maps"):
        if (candidate / "dialects.toml").is_file():
            return candidate
    raise KeyMapError(f"key_maps/ not found next to {here}.", hint="Reinstall lorabox.")


@dataclass(frozen=True)
class Module:
    """One weight a LoRA may target, in the canonical namespace of its table."""

    canonical: str
    diffusers: tuple[str, ...]  # one name, or the names of the row slices in order
    split: tuple[int, ...] | None = None  # proportions of the slices (None: a single diffusers name)
    op: str | None = None  # row transform from canonical to diffusers layout (ops.ROW_OPS)
    aliases: tuple[str, ...] = ()

    @property
    def parts(self) -> int:
        return len(self.diffusers) if self.split else 1


@dataclass(frozen=True)
class Hit:
    """What a module name resolved to: the module, the slice (None = whole) and the naming it was in."""

    module: Module
    part: int | None
    naming: str  # "canonical" | "diffusers" | "alias"


@dataclass(frozen=True)
class BaseName:
    """Where a canonical module lives in a base checkpoint spelled another way: its weight and bias keys, and
    `part` = (i, n) when it is the i-th of n equal row blocks of a fused weight (OpenCLIP's in_proj_weight)."""

    canonical: str
    weight: str
    bias: str
    part: tuple[int, int] | None = None


@dataclass(frozen=True)
class Variant:
    """One size of a model family that shares a table: its own block counts (so its own module set) and widths."""

    name: str
    title: str
    modelspec: str | None
    dims: dict[str, int]
    modules: frozenset[str] = field(repr=False)  # canonical names that exist in this variant


@dataclass
class Table:
    name: str
    title: str
    dims: dict[str, int]
    fingerprints: list[dict]
    variants: dict[str, Variant] = field(default_factory=dict)
    modules: dict[str, Module] = field(default_factory=dict)
    # other spellings of base checkpoints (merge only): name -> [BaseName], e.g. OpenCLIP inside SDXL files
    spellings: dict[str, list["BaseName"]] = field(default_factory=dict)
    dotted: dict[str, Hit] = field(default_factory=dict)  # any spelling with dots -> hit
    flat: dict[str, Hit] = field(default_factory=dict)  # the same spellings with `.` -> `_`


@dataclass(frozen=True)
class Component:
    """A model inside an architecture (the denoiser `unet`, or a text encoder) and its prefixes."""

    name: str
    table: Table
    prefixes: dict[str, str]  # dialect spelling -> prefix
    read: tuple[str, ...]  # further prefixes accepted on read

    def all_prefixes(self) -> list[str]:
        return list(dict.fromkeys([*self.prefixes.values(), *self.read]))


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    components: dict[str, Component]
    kohya_naming: str
    modelspec: str | None
    layouts: dict[str, dict[str, dict]] = field(default_factory=dict)  # base checkpoint layouts (merge)

    @property
    def unet(self) -> Component:
        return self.components["unet"]


# --- template expressions ---------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _eval(expr, env: dict):
    """Evaluate an int expression or `range(...)` from a table; only arithmetic, names and indexing."""
    if not isinstance(expr, str):
        return expr

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Subscript):
            return ev(node.value)[ev(node.slice)]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range" and not node.keywords:
            return list(range(*[ev(a) for a in node.args]))
        raise KeyMapError(f"unsupported expression in key map: {expr!r}")

    try:
        return ev(ast.parse(expr, mode="eval"))
    except (SyntaxError, KeyError, IndexError, TypeError) as exc:
        raise KeyMapError(f"bad expression in key map: {expr!r} ({exc})") from exc


def _assignments(group: dict, consts: dict):
    """Every binding of the group's `for` variables (in order, each may use the previous), plus `let`."""
    names = list(group.get("for", {}))

    def rec(i, env):
        if i == len(names):
            env = dict(env)
            for k, v in group.get("let", {}).items():
                env[k] = _eval(v, env)
            yield env
            return
        values = _eval(group["for"][names[i]], env)
        for v in values if isinstance(values, list) else [values]:
            yield from rec(i + 1, {**env, names[i]: v})

    yield from rec(0, dict(consts))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _entry(raw) -> tuple[str, tuple[str, ...], tuple[int, ...] | None, str | None, tuple[str, ...]]:
    if isinstance(raw, str):
        return raw, (raw,), None, None, ()
    if isinstance(raw, list) and len(raw) == 2:
        return raw[0], (raw[1],), None, None, ()
    if isinstance(raw, dict) and "c" in raw:
        d = raw.get("d", raw["c"])
        d = tuple(d) if isinstance(d, list) else (d,)
        split = tuple(raw.get("split", [1] * len(d))) if len(d) > 1 else None
        if split and len(split) != len(d):
            raise KeyMapError(f"key map entry {raw}: `split` needs one proportion per diffusers name")
        return raw["c"], d, split, raw.get("op"), tuple(raw.get("aliases", ()))
    raise KeyMapError(f"key map entry not understood: {raw!r}")


def _add_spelling(table: Table, name: str, hit: Hit):
    for index, key in ((table.dotted, name), (table.flat, name.replace(".", "_"))):
        old = index.get(key)
        if old is not None and (old.module.canonical, old.part) != (hit.module.canonical, hit.part):
            raise KeyMapError(
                f"key map {table.name}: {key!r} names both {old.module.canonical} and {hit.module.canonical}"
            )
        if old is None or hit.naming == "canonical":
            index[key] = hit


def _expand(data: dict, consts: dict):
    """(module, read-only alias names) for every entry of every group, expanded with `consts`."""
    sets = data.get("sets", {})
    for group in data.get("group", []):
        entries = list(group.get("modules", []))
        for set_name in group.get("use", []):
            entries += sets[set_name]
        for env in _assignments(group, consts):
            cpre, dpre = group["canonical"].format(**env), group["diffusers"].format(**env)
            alias_pres = [a.format(**env) for a in group.get("aliases", [])]
            for raw in entries:
                c, d, split, op, aliases = _entry(raw)
                module = Module(
                    _join(cpre, c.format(**env)), tuple(_join(dpre, x.format(**env)) for x in d), split, op,
                    tuple(_join(cpre, a.format(**env)) for a in aliases),
                )
                yield module, [_join(apre, c.format(**env)) for apre in alias_pres]


def fingerprint_width(fp: dict, dims: dict[str, int]) -> int:
    """The width a fingerprint expects: a dim name or an expression of dims (`9*hidden`)."""
    return _eval(fp["dim"], dims)


@functools.lru_cache(maxsize=None)
def read_table_data(name: str) -> dict:
    """A table file's data, with the keys it leaves out taken from the table it `extends`."""
    path = key_maps_dir() / f"{name}.toml"
    if not path.is_file():
        raise KeyMapError(f"no key map {path.name} in {path.parent}")
    data = tomllib.loads(path.read_text())
    base = data.pop("extends", None)
    return {**read_table_data(base), **data} if base else data


@functools.lru_cache(maxsize=None)
def load_table(name: str) -> Table:
    data = read_table_data(name)
    consts = dict(data.get("vars", {}))
    table = Table(data["architecture"], data.get("title", name), dict(data.get("dims", {})),
                  list(data.get("fingerprints", [])))
    for module, alias_names in _expand(data, consts):
        old = table.modules.get(module.canonical)
        if old is not None:
            if old != module:
                raise KeyMapError(f"key map {name}: {module.canonical} defined twice, differently")
            continue
        table.modules[module.canonical] = module
        _add_spelling(table, module.canonical, Hit(module, None, "canonical"))
        for part, dname in enumerate(module.diffusers):
            _add_spelling(table, dname, Hit(module, part if module.split else None, "diffusers"))
        for alias in module.aliases:
            _add_spelling(table, alias, Hit(module, None, "alias"))
        for alias in alias_names:  # another spelling of the whole group prefix, read only
            _add_spelling(table, alias, Hit(module, None, "alias"))
    for vname, spec in data.get("variants", {}).items():
        names = frozenset(m.canonical for m, _ in _expand(data, {**consts, **spec.get("vars", {})}))
        if names - table.modules.keys():
            raise KeyMapError(f"key map {name}: variant {vname} has modules beyond the table's `vars`: "
                              f"{sorted(names - table.modules.keys())[:3]}")
        dims = {**table.dims, **spec.get("dims", {})}
        for fp in table.fingerprints:
            fingerprint_width(fp, dims)  # every fingerprint must be computable for every variant
        table.variants[vname] = Variant(vname, spec.get("title", vname), spec.get("modelspec"), dims, names)
    for group in data.get("spelling", []):  # other spellings of base checkpoints (merge only)
        spelled = table.spellings.setdefault(group["name"], [])
        for env in _assignments(group, consts):
            cpre, bpre = group["canonical"].format(**env), group["base"].format(**env)
            for raw in group["modules"]:
                canonical = _join(cpre, raw["c"].format(**env))
                if canonical not in table.modules:
                    raise KeyMapError(f"key map {name}: spelling {group['name']} names unknown module {canonical}")
                weight = _join(bpre, raw.get("weight", raw.get("b", "") + ".weight").format(**env))
                bias = _join(bpre, raw.get("bias", raw.get("b", "") + ".bias").format(**env))
                spelled.append(BaseName(canonical, weight, bias, tuple(raw["part"]) if "part" in raw else None))
    return table


@functools.lru_cache(maxsize=None)
def load_dialects() -> dict:
    return tomllib.loads((key_maps_dir() / "dialects.toml").read_text())


@functools.lru_cache(maxsize=None)
def architecture_names() -> tuple[str, ...]:
    """Architectures with a denoiser table (text-encoder tables are reached through them). Kept, as the tables are:
    detection asks once per architecture, and a merge's LoRA loading races torch's import for the GIL."""
    return tuple(path.stem for path in sorted(key_maps_dir().glob("*.toml"))
                 if path.stem != "dialects" and "unet" in read_table_data(path.stem).get("components", {}))


@functools.lru_cache(maxsize=None)
def load_architecture(name: str) -> Architecture:
    if name not in architecture_names():
        raise UnknownArchitecture(f"unknown architecture {name!r}.", hint=f"Known: {', '.join(architecture_names())}.")
    data = read_table_data(name)
    components = {}
    for cname, spec in data["components"].items():
        table = load_table(spec.get("table", name))
        prefixes = {k: spec[k] for k in DIALECT_SPELLINGS}
        components[cname] = Component(cname, table, prefixes, tuple(spec.get("read", ())))
    return Architecture(name, data.get("title", name), components, data.get("kohya_naming", "canonical"),
                        data.get("modelspec"), dict(data.get("layouts", {})))
