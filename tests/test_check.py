"""`lorabox check`: the broken-LoRA corpus (scripts/make_check_corpus.py) is flagged by the right id and grade, clean
files of every architecture pass, and the runtime coverage model names exactly the keys the real loaders drop
(diffusers' load_lora_weights traced by tests/oracles/diffusers_coverage.py, ComfyUI's own load_lora)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lorabox.check import CATALOG, CHECKS, check_file
from lorabox.check.runner import check_paths, load_base, summarize
from lorabox.cli import main
from lorabox.conversion import convert, load_lora
from lorabox.io.safetensors import write_tensors
from lorabox.lora import Adapter
from lorabox.tensor import Tensor
from tests.helpers import random_lora

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
sys.path.insert(0, str(REPO / "scripts"))
from make_check_corpus import make_corpus  # noqa: E402



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, {c.name: c for c in make_corpus(folder)}


def _report(case):
    return check_file(case.file, base=load_base(case.base) if case.base else None, target=case.target)


def test_every_corpus_case_is_flagged_by_its_check(corpus):
    _, cases = corpus
    assert len(cases) >= 40 and sum(c.clean for c in cases.values()) >= 15
    wrong = []
    for case in cases.values():
        report = _report(case)
        got = {(f.id, f.grade) for f in report.findings}
        for expected in case.expect:
            if tuple(expected) not in got:
                wrong.append(f"{case.name}: expected {expected}, got {sorted(got)}")
        if report.exit_code() != case.exit_code:
            wrong.append(f"{case.name}: exit {report.exit_code()}, expected {case.exit_code}")
        if case.clean and report.ids("error"):
            wrong.append(f"{case.name}: clean file has errors {sorted(report.ids('error'))}")
        for finding_id, keys in case.keys.items():
            named = [f.keys for f in report.findings if f.id == finding_id]
            if named != [keys]:
                wrong.append(f"{case.name}: {finding_id} names {named}, expected {keys}")
    assert not wrong, "\n".join(wrong)


def test_clean_files_cover_every_architecture(corpus):
    _, cases = corpus
    archs = {check_file(c.file).architecture for c in cases.values() if c.clean}
    assert archs == {"sd15", "sdxl", "flux1", "flux2", "sd3", "wan"}


def test_every_id_is_documented_and_emitted_by_a_registered_check():
    emitted = {i for c in CHECKS for i in c.ids}
    container = {i for i in CATALOG if i.startswith("container.") and i != "container.trailing_bytes"}
    assert emitted | container | {"arch.unknown", "check.crashed"} == set(CATALOG)
    for finding_id, (grade, _remedy) in CATALOG.items():
        assert grade in ("error", "warning", "info"), finding_id


def test_variant_check_uses_lora_and_base_variants(corpus):
    _, cases = corpus
    base = load_base(cases["klein4b_on_klein9b_base"].base)
    assert (base.architecture, base.variant) == ("flux2", "flux2_klein_9b")
    (finding,) = [f for f in _report(cases["klein4b_on_klein9b_base"]).findings if f.id == "arch.variant_mismatch"]
    assert "flux2_klein_4b" in finding.message and "flux2_klein_9b" in finding.message


def test_wan21_lora_on_wan22_base_is_a_variant_mismatch(corpus):
    """The issue's "Wan2.1 vs 2.2": a 1.3B LoRA (hidden 1536) against a TI2V 5B base (3072, 48 latent channels)."""
    _, cases = corpus
    base = load_base(cases["wan21_1_3b_on_wan22_5b_base"].base)
    assert (base.architecture, base.layout, base.variant) == ("wan", "original", "wan22_ti2v_5b")
    report = _report(cases["wan21_1_3b_on_wan22_5b_base"])
    assert report.architecture == "wan"
    (finding,) = [f for f in report.findings if f.id == "arch.variant_mismatch"]
    assert (finding.grade, report.exit_code()) == ("error", 1)
    assert "wan21_t2v_1_3b" in finding.message and "wan22_ti2v_5b" in finding.message
    assert not [f for f in _report(cases["wan22_5b_on_wan22_5b_base"]).findings if f.id.startswith("arch.") and
                f.grade != "info"]


def test_for_target_regrades(corpus):
    _, cases = corpus
    path = cases["private_metadata"].file
    assert ("meta.private", "warning") in {(f.id, f.grade) for f in check_file(path).findings}
    assert ("meta.private", "error") in {(f.id, f.grade) for f in check_file(path, target="hf").findings}
    hashes = [f for f in check_file(path, target="civitai").findings if f.id == "meta.hashes"]
    assert len(hashes) == 1 and "autov2=" in hashes[0].message
    missing = cases["missing_alpha"].file
    assert ("alpha.missing", "info") in {(f.id, f.grade) for f in check_file(missing, target="diffusers").findings}


# --- CLI -------------------------------------------------------------------------------------------------------

def test_cli_exit_codes_and_json_lines(corpus):
    folder, cases = corpus
    runner = CliRunner()
    assert runner.invoke(main, ["check", cases["clean_sd15_kohya"].file]).exit_code == 0
    res = runner.invoke(main, ["check", cases["nan"].file])
    assert res.exit_code == 1 and "tensors.nonfinite" in res.output and "fix:" in res.output
    assert runner.invoke(main, ["check", cases["pickle"].file]).exit_code == 2
    assert runner.invoke(main, ["check", cases["missing_alpha"].file]).exit_code == 0
    assert runner.invoke(main, ["check", cases["missing_alpha"].file, "--strict"]).exit_code == 1
    res = runner.invoke(main, ["check", str(folder), "--json", "--jobs", "2"])
    assert res.exit_code == 2, res.output[-2000:]  # the folder holds a pickle, a truncated file, ...
    lines = [json.loads(line) for line in res.output.splitlines()]
    summary = lines[-1]
    assert summary["summary"] and summary["files"] == len(list(folder.glob("*.safetensors"))) + 1  # + pickled.ckpt
    findings = lines[:-1]
    assert {"id", "grade", "file", "message", "remedy", "keys"} <= set(findings[0])
    assert {f["file"] for f in findings if f["id"] == "container.pickle"} == {cases["pickle"].file}
    res = runner.invoke(main, ["check", str(folder), "--jobs", "2"])
    assert "checked " in res.output and "container.pickle (error)" in res.output


def test_cli_unusable_base_is_one_error_line(tmp_path, corpus):
    _, cases = corpus
    res = CliRunner().invoke(main, ["check", cases["clean_sd15_kohya"].file, "--base", str(tmp_path / "nope.safetensors")])
    assert res.exit_code == 2 and res.output.startswith("lorabox: error:")


def test_parallel_run_equals_serial_run(corpus):
    folder, _ = corpus
    serial = list(check_paths([folder], jobs=1))
    parallel = list(check_paths([folder], jobs=2))
    assert [(r.file, [f.as_dict() for f in r.findings]) for r in serial] == \
           [(r.file, [f.as_dict() for f in r.findings]) for r in parallel]
    assert summarize(parallel)["exit_code"] == 2


def test_check_imports_no_torch(corpus):
    import subprocess

    _, cases = corpus
    code = ("import sys; from lorabox.cli import main; sys.argv = ['lorabox', 'check', %r]\n"
            "try:\n    main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'" % cases["nan"].file)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


# --- runtime coverage against the real loaders -------------------------------------------------------------------

def _coverage_keys(path, finding_id) -> list[str]:
    named = [f.keys for f in check_file(path).findings if f.id == finding_id]
    return named[0] if named else []


def _unmodelled(path, arch, runtime) -> list[str]:
    from lorabox.check.runtimes import coverage
    from lorabox.dialects import parse_key
    from lorabox.io.safetensors import read_header
    from lorabox.keymap import load_architecture

    spec = load_architecture(arch)
    return coverage(runtime, spec, {k: parse_key(k, spec) for k in read_header(path)[0]}).unmodelled


def _spell(sd, spelling):
    """Read-only spellings, made by the renaming rules of tests/test_read_dialects.py from a diffusers file."""
    from tests import test_read_dialects

    return test_read_dialects.respell(sd, getattr(test_read_dialects, spelling))


WRITTEN = ("kohya", "comfyui", "diffusers", "bfl")
RESPELLED = {"sd15": ("kohya_diffusers_names", "lycoris", "diffsynth", "diffusers_old"),
             "sdxl": ("kohya_diffusers_names", "lycoris", "diffsynth", "diffusers_old"),
             "flux1": ("lycoris", "diffsynth", "diffusers_old", "onetrainer_flux"), "flux2": (), "sd3": (), "wan": ()}
COMFY_CASES = [(a, s) for a in ("sd15", "sdxl", "flux1", "flux2", "sd3", "wan") for s in WRITTEN + RESPELLED[a]]


def _spelled(lora, spelling):
    if spelling in WRITTEN:
        res = convert(lora, spelling)
        return res.tensors, res.metadata
    res = convert(lora, "diffusers")
    return _spell(res.tensors, spelling), res.metadata


@pytest.mark.parametrize("arch,spelling", COMFY_CASES, ids=[f"{a}-{s}" for a, s in COMFY_CASES])
def test_comfyui_coverage_matches_comfyui_load_lora(tmp_path, arch, spelling):
    from tests.helpers import to_torch
    from tests.oracles.comfy import comfy_available, comfy_unloaded_keys

    if not comfy_available():
        pytest.fail("ComfyUI oracle missing: run scripts/get_oracles.sh")
    sd, _ = _spelled(random_lora(arch, every=3, rank=2, text_encoders=(spelling != "bfl")), spelling)
    path = tmp_path / "lora.safetensors"
    write_tensors(path, sd)
    expected = comfy_unloaded_keys(arch, to_torch(sd))
    assert _coverage_keys(path, "coverage.comfyui_drops") == expected
    assert not _unmodelled(path, arch, "comfyui")


def _with_t5(lora):
    """Add two T5 adapters shaped for the tiny pipeline's T5 (diffusers loads no LoRA into T5)."""
    from tests.oracles import tiny_models

    t5 = tiny_models.tiny_t5().state_dict()
    rng = np.random.default_rng(5)
    for name in ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wo"):
        rows, cols = t5[name + ".weight"].shape
        lora.add(Adapter("t5xxl", name, None, {"down": Tensor.from_values(rng.standard_normal((2, cols)), "F32"),
                                               "up": Tensor.from_values(rng.standard_normal((rows, 2)), "F32")},
                         Tensor.scalar(2.0)))
    return lora


DIFFUSERS_SOURCES = {"sd15": "sd15_peft", "sdxl": "sdxl_kohya_sgm", "flux1": "flux1_kohya_bfl", "flux2": "flux2_peft",
                     "sd3": "sd3_peft"}
# Wan has no PEFT fixture: its diffusers rules are not written (its keys are reported unmodelled for diffusers)
DIFFUSERS_CASES = [(DIFFUSERS_SOURCES[a], a, s) for a, s in COMFY_CASES
                   if s != "kohya_diffusers_names" and a != "wan"] + \
                  [("flux1_kohya_bfl+t5", "flux1", d) for d in ("kohya", "diffusers")] + \
                  [("sd15_peft", "sd15", "raw_peft"), ("sd15_peft+te_mlp_only", "sd15", "diffusers"),
                   ("flux1_kohya_bfl+te_mlp_only", "flux1", "diffusers")]


@pytest.mark.parametrize("source,arch,spelling", DIFFUSERS_CASES, ids=[f"{s}-{d}" for s, _, d in DIFFUSERS_CASES])
def test_diffusers_coverage_matches_load_lora_weights(tmp_path, source, arch, spelling):
    from tests.oracles.diffusers_coverage import diffusers_coverage

    lora = load_lora(FIXTURES / f"{source.split('+')[0]}.safetensors")
    if source.endswith("+t5"):
        lora = _with_t5(lora)
    if source.endswith("+te_mlp_only"):  # diffusers infers the PEFT text-encoder format from attention keys only
        lora.adapters = {k: a for k, a in lora.adapters.items() if a.component == "unet" or ".mlp." in a.module}
    keep = 6 if arch in ("sd15", "sdxl") else 1  # every 6th SD adapter (all components stay): peft injection is the slow part
    lora.adapters = {k: a for i, (k, a) in enumerate(sorted(lora.adapters.items(), key=str)) if i % keep == 0
                     and (spelling != "bfl" or a.component == "unet")}  # bare names: the denoiser only
    sd, metadata = _spelled(lora, spelling)
    path = tmp_path / f"lora.{spelling}.safetensors"
    write_tensors(path, sd, metadata)
    truth = diffusers_coverage(arch, path)
    report = check_file(path)
    named = {f.id: f.keys for f in report.findings if f.id.startswith("coverage.diffusers")}
    if truth.refused:
        assert list(named) == ["coverage.diffusers_refuses"] and named["coverage.diffusers_refuses"] == truth.dropped
    else:
        assert named.get("coverage.diffusers_drops", []) == truth.dropped
    assert not _unmodelled(path, arch, "diffusers")


def test_torch_zip_checkpoint_is_refused_as_pickle(tmp_path):
    import torch

    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4)}, path)
    report = check_file(path)
    assert [(f.id, f.grade) for f in report.findings] == [("container.pickle", "error")] and report.exit_code() == 2
