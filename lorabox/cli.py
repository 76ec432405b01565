"""The `lorabox` command: each subcommand parses, calls one library function and renders.

Errors: a LoraboxError (or a plain OS error) becomes one line on stderr and its exit code; `--debug`
shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .keymap import architecture_names


def _fail(exc: BaseException) -> None:
    from .errors import LoraboxError

    if isinstance(exc, BrokenPipeError):  # `lorabox inspect x | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)

    if isinstance(exc, LoraboxError):
        click.echo(f"lorabox: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        click.echo(f"lorabox: error: no space left on the device{f' ({exc.filename})' if exc.filename else ''}; "
                   f"the partial output was removed. Free some space or write elsewhere with -o.", err=True)
        sys.exit(2)
    if isinstance(exc, (OSError, MemoryError)):
        click.echo(f"lorabox: error: {exc}", err=True)
        sys.exit(2)
    if isinstance(exc, Stopped):
        click.echo(f"lorabox: stopped by {signal.Signals(exc.signum).name}; nothing was written.", err=True)
        sys.exit(128 + exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        click.echo("lorabox: interrupted; nothing was written.", err=True)
        sys.exit(130)
    click.echo(f"lorabox: internal error: {type(exc).__name__}: {exc}. Run again with --debug and report it.",
               err=True)
    sys.exit(70)


class Stopped(BaseException):
    """SIGTERM (a scheduler, `timeout`, `kill`) or SIGHUP (the terminal closed), raised in the main thread as Ctrl+C's
    KeyboardInterrupt is, so that the same cleanup runs: every writer removes its temporary file. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` takes it for an error to handle."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into `Stopped` where they would end the process on the spot (their default); one
    ignored by whoever started us (`nohup`) stays ignored. Once stopping, a repeat of either is ignored, so that the
    cleanup is not cut short."""
    stopping = []

    def stop(signum, frame):
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, stop)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place errors become messages
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail(exc)


@contextlib.contextmanager
def _byte_bar(desc: str, hidden: bool):
    """A tqdm bar in bytes for a library call's `progress(done, total)`; it appears once the work reports
    progress, not while the inputs are being checked."""
    from tqdm import tqdm

    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=hidden, leave=False)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


arch_option = click.option("--arch", type=click.Choice(architecture_names()), default=None,
                           help="Architecture, when the keys alone cannot tell.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(__version__, prog_name="lorabox")
@click.pass_context
def main(ctx, debug):
    """Convert, inspect, merge and check LoRA files for diffusion models.

    \b
    Example:
      lorabox inspect my_lora.safetensors
      lorabox convert my_lora.safetensors --to comfyui
    """
    ctx.obj = {"debug": debug}


@main.command("inspect")
@click.argument("file", type=click.Path())
@arch_option
@json_option
def inspect_cmd(file, arch, as_json):
    """Describe a LoRA file: architecture, dialect, ranks, alphas, targeted blocks.

    \b
    Example:
      lorabox inspect lora.safetensors --json
    """
    from .summary import inspect_file

    info = inspect_file(file, arch=arch)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['file']}")
    size = f" ({info['size']})" if info["size"] != "unknown" else ""
    click.echo(f"  architecture  {info['architecture']}: {info['title']}{size}")
    if info["variant"]:
        click.echo(f"  variant       {info['variant']}: {info['variant_title']}")
    for note in info["size_notes"][:2]:
        click.echo(f"                {note}")
    if len(info["size_notes"]) > 2:
        click.echo("                ... and more (--json lists them)")
    if info["metadata_says"] and info["metadata_says"] != info["architecture"]:
        click.echo(f"  WARNING       metadata says {info['metadata_says']}")
    click.echo(f"  dialect       {info['dialect']}")
    click.echo(f"  adapters      {info['adapters']} from {info['keys']} keys")
    click.echo(f"  ranks         {_counts(info['ranks'])}")
    click.echo(f"  alphas        {_counts(info['alphas'])}")
    click.echo(f"  dtypes        {_counts(info['dtypes'])}")
    for name, c in info["components"].items():
        blocks = ", ".join(list(c["blocks"])[:6]) + (f", ... ({len(c['blocks'])} blocks)" if len(c["blocks"]) > 6 else "")
        click.echo(f"  {name:13s} {c['adapters']} adapters ({_counts(c['kinds'])}): {blocks}")
    if info["unknown_keys"]:
        click.echo(f"  unknown keys  {len(info['unknown_keys'])}: {', '.join(info['unknown_keys'][:5])}")
    for k, v in info["metadata"].items():
        click.echo(f"  {k} = {v[:100]}")


def _counts(d: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in d.items())


@main.command("convert")
@click.argument("src", type=click.Path())
@click.option("--to", "to", required=True, type=click.Choice(["kohya", "diffusers", "comfyui", "bfl"]),
              help="Target dialect.")
@click.option("-o", "--output", type=click.Path(), default=None, help="Output file (default: IN.<dialect>.safetensors).")
@arch_option
@click.option("--drop-unknown", is_flag=True, help="Leave out keys no key map understands, and report them.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (never an input).")
@json_option
def convert_cmd(src, to, output, arch, drop_unknown, overwrite, as_json):
    """Convert a LoRA between dialects, keeping every weight delta exact.

    Fused and split q/k/v, alpha and row order are handled exactly; keys that are not understood stop
    the conversion unless --drop-unknown.

    \b
    Example:
      lorabox convert flux_lora_kohya.safetensors --to diffusers -o flux_lora_peft.safetensors
    """
    from .conversion import convert_file

    result = convert_file(src, to, output, arch=arch, drop_unknown=drop_unknown, overwrite=overwrite)
    report = result.report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{src} ({report['architecture']}, {report['from']}) -> {report['output']} ({to}): "
               f"{report['adapters']} adapters, {report['keys']} keys")
    if report["dropped"]:
        click.echo(f"dropped {len(report['dropped'])} unknown key(s): {', '.join(report['dropped'][:10])}", err=True)
    for note in report["notes"]:
        click.echo(f"note: {note}", err=True)


def _lora_spec(value: str, default: float) -> tuple[str, float]:
    """`path` or `path:ratio`; a value that names an existing file is a path, even with a `:` in it."""
    from .errors import LoraboxError

    path, sep, tail = value.rpartition(":")
    if not sep or not path or os.path.exists(value):
        return value, default
    try:
        return path, float(tail)
    except ValueError:
        raise LoraboxError(f"--lora {value}: the ratio {tail!r} is not a number.",
                           hint="Write --lora FILE:0.8.") from None


def _block_ratio(value: str) -> tuple[str, float]:
    from .errors import LoraboxError

    pattern, sep, ratio = value.rpartition("=")
    try:
        if not sep or not pattern:
            raise ValueError
        return pattern, float(ratio)
    except ValueError:
        raise LoraboxError(f"--block-ratio {value}: expected PATTERN=NUMBER.",
                           hint="For example --block-ratio 'single_blocks.*=0.5'.") from None


@main.command("merge")
@click.argument("base", type=click.Path())
@click.option("--lora", "loras", multiple=True, required=True, metavar="FILE[:RATIO]",
              help="A LoRA to merge, with its own ratio. Repeat for several.")
@click.option("--ratio", type=float, default=1.0, show_default=True, help="Ratio for LoRAs given without one.")
@click.option("-o", "--output", type=click.Path(), required=True, help="Output file (a folder for a folder base).")
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"]), default="keep",
              show_default=True, help="Dtype of the output's floating tensors (fp8: matrices only).")
@click.option("--quant", type=click.Choice(["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]),
              default=None, help="Write GGUF of this type (ComfyUI-GGUF's conventions). A GGUF base stays GGUF.")
@click.option("--rounding", type=click.Choice(["stochastic", "nearest"]), default="stochastic", show_default=True,
              help="fp8 rounding of LoRA-patched weights (stochastic keeps weak LoRAs; seeded per key).")
@click.option("--block-ratio", "block_ratios", multiple=True, metavar="PATTERN=R",
              help="Multiply the ratio on canonical modules matching PATTERN (fnmatch), e.g. 'double_blocks.1*=0.5'.")
@click.option("--fp8-layout", type=click.Choice(["legacy", "comfy_quant"]), default=None,
              help="With --dtype fp8_*: write ComfyUI scaled fp8 (one scale per denoiser matrix) in this layout.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where deltas are computed: auto takes a CUDA GPU when torch sees one. Same bytes on every device.")
@arch_option
@click.option("--drop-unknown", is_flag=True, help="Merge without adapters that land on no base weight, and report them.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output (never an input).")
@json_option
def merge_cmd(base, loras, ratio, output, dtype, quant, rounding, block_ratios, fp8_layout, device, arch, drop_unknown,
              overwrite, as_json):
    """Merge LoRAs into a base checkpoint, streaming tensor by tensor in bounded memory.

    BASE is a .safetensors checkpoint (SD1.5/SDXL single file, BFL or ComfyUI-packaged FLUX.1), a diffusers
    model folder, or a GGUF file. Deltas are computed in float64 and rounded once.

    \b
    Example:
      lorabox merge flux1-dev.safetensors --lora style.safetensors:0.8 --lora detail.safetensors:0.3 -o merged.safetensors
      lorabox merge flux1-dev.safetensors --lora style.safetensors --quant Q8_0 -o flux1-dev-style-Q8_0.gguf
      lorabox merge flux1-dev.safetensors --lora style.safetensors --dtype fp8_e4m3fn --fp8-layout comfy_quant -o out.safetensors
    """
    from .merge.engine import merge

    specs = [_lora_spec(v, ratio) for v in loras]
    patterns = [_block_ratio(v) for v in block_ratios]
    with _byte_bar("merge", as_json) as progress:
        report = merge(base, specs, output, dtype=dtype, rounding=rounding, quant=quant, block_ratios=patterns,
                       drop_unknown=drop_unknown, arch=arch, overwrite=overwrite, device=device,
                       fp8_layout=fp8_layout, progress=progress)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
    click.echo(f"{base} ({report.architecture}, {report.layout} layout) + {len(specs)} LoRA(s) -> {report.output}: "
               f"{report.merged} of {report.tensors} tensors changed on {report.device}, {report.seconds:.1f} s "
               f"({', '.join(f'{k} {v:.1f} s' for k, v in report.stages.items())}"
               + (f"; {report.base_from_page_cache / 1e9:.1f} GB of the base from the page cache"
                  if report.base_from_page_cache else "") + ")")
    if report.dropped:
        click.echo(f"dropped {len(report.dropped)} adapter(s) that land nowhere: {', '.join(report.dropped[:10])}",
                   err=True)


@main.command("hash")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@json_option
def hash_cmd(files, as_json):
    """Print the hashes CivitAI and the web UIs identify a file by: SHA256, AutoV1, AutoV2, AutoV3, CRC32.

    AutoV3 (and kohya's sshs_model_hash) cover only the tensor bytes, so they survive metadata edits;
    the others change with every header write: hash after the last one.

    \b
    Example:
      lorabox hash my_lora.safetensors
      lorabox hash *.safetensors --json
    """
    from .publish.hashes import file_hashes

    results = []
    for file in files:
        with _byte_bar("hash", as_json) as progress:
            results.append({"file": file, **file_hashes(file, progress=progress)})
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    labels = {"sha256": "SHA256", "autov1": "AutoV1", "autov2": "AutoV2", "autov3": "AutoV3",
              "sshs_model_hash": "sshs_model_hash", "crc32": "CRC32", "crc32_civitai": "CRC32 (CivitAI)"}
    for r in results:
        click.echo(r["file"])
        for key, label in labels.items():
            click.echo(f"  {label:16s} {r[key] if r[key] is not None else '-'}")


@main.command("meta")
@click.argument("file", type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Set a metadata key (repeat for several).")
@click.option("--unset", multiple=True, metavar="KEY", help="Remove a metadata key.")
@click.option("--strip-private", is_flag=True, help="Redact absolute paths, user names, e-mails, ss_dataset_dirs.")
@click.option("--from-training", is_flag=True,
              help="Fill modelspec title/date/trigger/resolution from the kohya/ai-toolkit ss_* training record.")
@click.option("--no-fill", is_flag=True, help="Do not fill missing modelspec and ss_network_* keys from the tensors.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Write here instead of replacing FILE (FILE is otherwise replaced atomically).")
@click.option("--dry-run", is_flag=True, help="Show the changes, write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file (never an input).")
@arch_option
@json_option
def meta_cmd(file, sets, unset, strip_private, from_training, no_fill, output, dry_run, overwrite, arch, as_json):
    """Show or rewrite a LoRA's header metadata (ModelSpec 1.0.1, kohya ss_*), leaving the tensor bytes as they are.

    With no edit option it only shows the metadata. Any edit also fills the missing ModelSpec keys
    (architecture from the keys and shapes, implementation, title, date, hash_sha256 of the tensor bytes) and
    ss_network_dim/alpha/module and ss_base_model_version, unless --no-fill. AutoV3 stays the same;
    SHA256/AutoV2 change: they are printed after the write.

    \b
    Example:
      lorabox meta my_lora.safetensors
      lorabox meta my_lora.safetensors --from-training --strip-private --set modelspec.author=me
      lorabox meta my_lora.safetensors --set modelspec.trigger_phrase=ohwx -o published.safetensors
    """
    from .publish.meta import edit_metadata, show_metadata

    if not (sets or unset or strip_private or from_training or output or dry_run):
        info = show_metadata(file)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        click.echo(info["file"])
        for k, v in info["metadata"].items():
            click.echo(f"  {k} = {v if len(v) <= 120 else v[:117] + '...'}")
        if info["modelspec_missing"]:
            click.echo(f"  missing ModelSpec keys: {', '.join(info['modelspec_missing'])}")
        return
    with _byte_bar("meta", as_json) as progress:
        result = edit_metadata(file, sets=sets, unset=unset, strip=strip_private, from_training=from_training,
                               fill=not no_fill, output=output, overwrite=overwrite, write=not dry_run, arch=arch,
                               progress=progress)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    for c in result.changes:
        old = "(new)" if c["old"] is None else c["old"][:60]
        new = "(removed)" if c["new"] is None else c["new"][:80]
        click.echo(f"  {c['key']}: {old} -> {new}")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if result.output is None:
        click.echo(f"{file}: {len(result.changes)} change(s); dry run, nothing written")
        return
    h = result.hashes
    click.echo(f"{result.output}: {len(result.changes)} change(s) written; SHA256 {h['sha256']}, "
               f"AutoV2 {h['autov2']}, AutoV3 {h['autov3']}")


@main.command("card")
@click.argument("file", type=click.Path())
@click.option("--repo-id", required=True, metavar="OWNER/NAME", help="The Hugging Face repository it will live in.")
@click.option("--base-model", default=None, metavar="OWNER/NAME", help="Base model id (default: from the architecture).")
@click.option("--trigger", default=None, help="Trigger words (default: modelspec.trigger_phrase or ss_tag_frequency).")
@click.option("--license", "license_", default=None, help="License id, e.g. apache-2.0 or other (default: the base's).")
@click.option("--license-name", default=None, help="Name of an `other` license.")
@click.option("--license-link", default=None, help="Link to an `other` license.")
@click.option("-o", "--output", type=click.Path(), default=None, help="Folder for README.md (default: FILE's folder).")
@click.option("--widget-image", "widget_images", multiple=True, type=click.Path(),
              help="A sample image inside the folder, shown on the model page (repeat for several).")
@arch_option
@click.option("--overwrite", is_flag=True, help="Replace an existing README.md.")
@json_option
def card_cmd(file, repo_id, base_model, trigger, license_, license_name, license_link, output, widget_images, arch,
             overwrite, as_json):
    """Write a Hugging Face model card (README.md) for a LoRA, then check the folder as the Hub and diffusers see it.

    The front matter says base_model, base_model_relation: adapter, library_name: diffusers, license, tags
    and instance_prompt; the body has diffusers and ComfyUI usage and the file's hashes.

    \b
    Example:
      lorabox card my_flux_lora.safetensors --repo-id me/my-flux-lora --trigger ohwx
      lorabox card style.safetensors --repo-id me/style --widget-image samples/1.png -o .
    """
    from .publish.card import make_card

    result = make_card(file, repo_id, base_model=base_model, trigger=trigger, license=license_,
                       license_name=license_name, license_link=license_link, out_dir=output,
                       widget_images=widget_images, arch=arch, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"{result.readme}: base_model {result.front_matter['base_model']}, license {result.front_matter['license']}")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    for f in result.findings:
        click.echo(f"{f.level}: {f.message}", err=f.level != "info")


@main.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--base", type=click.Path(), default=None,
              help="Base checkpoint file or diffusers model folder: flag LoRAs of another architecture or variant, "
                   "and adapters that land on no weight of it.")
@click.option("--for", "target", type=click.Choice(["comfyui", "diffusers", "kohya", "civitai", "hf"]), default=None,
              help="Grade for this runtime or hub: its dropped keys become errors (runtimes), metadata and privacy "
                   "findings become warnings/errors and hashes are listed (hubs).")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None, help="Worker processes (default: one per CPU).")
@click.option("--strict", is_flag=True, help="Warnings fail the check too (exit 1).")
@click.option("--verbose", "-v", is_flag=True, help="Show info findings for every file (shown by default for one file).")
@arch_option
@json_option
@click.pass_context
def check_cmd(ctx, paths, base, target, jobs, strict, verbose, arch, as_json):
    """Check LoRA files and folders: graded findings (error / warning / info), each with a stable id and a remedy.

    Container (safetensors only, pickle refused, header sane), NaN/Inf, dead modules, down/up pairing and ranks,
    alpha, architecture vs metadata and --base, which keys diffusers, ComfyUI and kohya would drop, one dialect
    per file, dtypes, size, metadata completeness and private data. Folders are scanned recursively and checked in
    parallel. Exit 0 when nothing blocks, 1 when a check fails, 2 when an input is unusable. --json prints JSON
    Lines: one object per finding, then a summary line.

    \b
    Example:
      lorabox check my_lora.safetensors --for comfyui
      lorabox check loras/ --jobs 4 --json > findings.jsonl
      lorabox check klein_lora.safetensors --base flux-2-klein-9b.safetensors
    """
    from tqdm import tqdm

    from .check.runner import check_paths, summarize

    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="file", desc="check", disable=True if as_json or total < 2 else None,
                       leave=False)
        bar.update(done - bar.n)

    reports = []
    try:
        for report in check_paths(paths, base=base, target=target, arch=arch, jobs=jobs, progress=progress):
            reports.append(report)
            if as_json:
                for f in report.findings:
                    click.echo(json.dumps(f.as_dict()))
            else:
                _render_report(report, verbose=verbose or len(paths) == 1 and not _is_dir(paths[0]), strict=strict,
                               echo=(bar.write if bar is not None and not bar.disable else click.echo))
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(reports, strict=strict)
    if as_json:
        click.echo(json.dumps(summary))
    elif len(reports) > 1:
        _render_summary(summary)
    ctx.exit(summary["exit_code"])


def _is_dir(path: str) -> bool:
    return os.path.isdir(path)


def _render_report(report, *, verbose: bool, strict: bool, echo) -> None:
    shown = [f for f in report.findings if verbose or f.grade != "info"]
    code = report.exit_code(strict)
    status = {0: "ok", 1: "FAIL", 2: "UNUSABLE"}[code]
    what = ", ".join(x for x in (report.architecture, report.dialect) if x)
    echo(f"{report.file}: {status}" + (f" ({what})" if what else ""))
    for f in shown:
        echo(f"  {f.grade:7s} {f.id:26s} {f.message}")
        if f.remedy and f.grade != "info":
            echo(f"  {'':7s} {'':26s} fix: {f.remedy}")


def _render_summary(summary: dict) -> None:
    click.echo(f"\nchecked {summary['files']} files: {summary['ok']} ok, {summary['failed']} failed, "
               f"{summary['unusable']} unusable")
    for name, count in summary["findings"].items():
        click.echo(f"  {count:6d}  {name}")


def _settings(values: tuple[str, ...]) -> dict:
    """`--set key=value` pairs, values parsed as TOML (numbers, booleans, strings, lists)."""
    import tomllib

    from .errors import TrainingError

    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainingError(f"--set {item}: expected KEY=VALUE.", hint="For example --set eval_every=50.")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # a bare string
    return out


@main.command("train")
@click.argument("data", required=False, type=click.Path())
@click.option("--base", type=click.Path(), default=None, help="diffusers pipeline folder (model_index.json).")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output folder: the adapter, samples, checkpoints, cache, loss.png.")
@click.option("--minimal", is_flag=True,
              help="Only DATA and --base needed, the rest per-architecture defaults. With neither: the built-in "
                   "tiny base and data set (a CPU run of about half a minute).")
@click.option("--format", "fmt", type=click.Choice(["diffusers", "kohya", "comfyui"]), default=None,
              help="Dialect of the saved adapter (default diffusers).")
@click.option("--trigger", default=None, help="Word prepended to every caption.")
@click.option("--rank", type=int, default=None, help="LoRA rank (default per architecture).")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (default = rank).")
@click.option("--steps", type=int, default=None, help="Optimizer steps.")
@click.option("--resolution", type=int, default=None, help="Training resolution in pixels (bucket area).")
@click.option("--lr", "learning_rate", type=float, default=None, help="Learning rate.")
@click.option("--batch-size", type=int, default=None)
@click.option("--objective", type=click.Choice(["flow", "epsilon", "v_prediction"]), default=None,
              help="Must be the base's own (read from its scheduler); given only to assert it.")
@click.option("--min-snr-gamma", type=float, default=None, help="Min-SNR-gamma weighting (SD1.5/SDXL), e.g. 5.")
@click.option("--denoiser-file", type=click.Path(), default=None,
              help="Single-file transformer/UNet checkpoint to train on instead of the folder's.")
@click.option("--config", "config_file", type=click.Path(), default=None, help="TOML file of settings.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any setting, e.g. --set eval_every=50.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the output folder.")
@json_option
def train_cmd(data, base, output, minimal, fmt, trigger, rank, alpha, steps, resolution, learning_rate, batch_size,
              objective, min_snr_gamma, denoiser_file, config_file, settings, resume, as_json):
    """Train a LoRA on a folder of images with same-named .txt captions.

    The objective comes from the base (flow matching for FLUX/SD3, epsilon or v for SD1.5/SDXL), the targets
    and defaults from its architecture; the adapter is saved through lorabox's converter with ss_* and
    modelspec metadata. Several GPUs or machines: run it under accelerate (see the README).

    \b
    Example:
      lorabox train --minimal
      lorabox train photos/ --base FLUX.1-dev/ -o out/ --trigger ohwx --minimal
      lorabox train photos/ --base sdxl-base/ -o out/ --rank 32 --steps 2000 --format kohya
      accelerate launch -m lorabox train photos/ --base FLUX.1-dev/ -o out/ --config run.toml
    """
    from tqdm import tqdm

    from .errors import TrainingError
    from .train.config import builtin_layer, load_toml, make_config

    layers = []
    if minimal and not data and not base:
        layers.append(builtin_layer())
    elif not data or not base:
        raise TrainingError("give both DATA and --base.",
                            hint="Or `lorabox train --minimal` alone for the built-in tiny base and data set.")
    if not output and not minimal and not any("output" in layer for layer in layers):
        raise TrainingError("no output folder.", hint="Pass -o OUT (or --minimal for the default lora-out/).")
    if config_file:
        layers.append(load_toml(config_file))
    layers.append(_settings(settings))
    layers.append(dict(data=data, base=base, output=output, format=fmt, trigger=trigger, rank=rank, alpha=alpha,
                       steps=steps, resolution=resolution, learning_rate=learning_rate, batch_size=batch_size,
                       objective=objective, min_snr_gamma=min_snr_gamma, denoiser_file=denoiser_file))
    cfg = make_config(*layers)

    from .train.loop import train

    bar = None

    def say(text):  # the run's log: stdout, or stderr when stdout carries the JSON result
        if bar is not None:
            bar.write(text, file=sys.stderr if as_json else sys.stdout)
        else:
            click.echo(text, err=as_json)

    def progress(event):
        nonlocal bar
        kind = event["event"]
        if kind == "start":
            for line in event["lines"]:
                say(line)
        elif kind == "note":
            say(event["text"])
        elif kind == "begin":
            bar = tqdm(total=event["total"], initial=event["start"], unit="step", desc="train", dynamic_ncols=True)
        elif kind == "step" and bar is not None:
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.4f}")
        elif kind == "eval":
            what = "held-out" if event["held_out"] else "training-image"
            say(f"step {event['step']}: {what} loss at fixed timesteps {event['loss']:.5f}")

    try:
        result = train(cfg, resume=resume, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if not result.main_process:
        return
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    for row in result.samples:
        click.echo(f"samples     {row['prompt']!r}: {row['base']} (base), {row['lora']} (LoRA)")
    click.echo(f"loss curve  {Path(result.adapter).parent / 'loss.png'}")
    click.echo(f"saved       {result.adapter} ({result.steps} steps, {result.seconds:.0f} s)")


def run() -> None:
    """The console script: `main`, then, where a command loaded torch or numba (merge, train), a prompt exit.
    Tearing their modules down at interpreter exit takes 0.4-0.5 s (torch) or 0.25 s (numba and llvmlite, a merge
    that needs no torch) here, after the work is done: every output is committed and every file closed by then, and
    the worker threads have ended. A process of a distributed run
    (`accelerate launch`) exits the usual way, leaving its process group to torch's own teardown."""
    _stop_on_signals()
    try:
        try:
            main()
            code = 0
        except Stopped as exc:  # before or after a command ran (commands report their own, `_Group`)
            _fail(exc)
    except SystemExit as exc:
        code = exc.code
    torch = sys.modules.get("torch")
    if (torch is None and "numba" not in sys.modules) or (torch is not None and _distributed(torch)):
        sys.exit(code)
    if not isinstance(code, int):  # what sys.exit does with None and with a message
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that left, a closed stream: nothing more can be said there
            pass
    os._exit(code)


def _distributed(torch) -> bool:
    """Whether this process belongs to an initialised torch.distributed group. A torch still being imported on
    `merge.compute`'s background thread (a merge refused early) may not have the attribute yet: it has no group, and
    `os._exit` does not wait for that import, nor tear the interpreter down under it."""
    try:
        return bool(torch.distributed.is_available() and torch.distributed.is_initialized())
    except AttributeError:
        return False


if __name__ == "__main__":
    run()
