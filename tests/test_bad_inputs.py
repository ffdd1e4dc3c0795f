"""Bad inputs, by class, through the API and the CLI (in process): each must be refused with a
``SpearError`` / ``spear-compile: error: ...`` line naming the culprit (never a traceback), leave the
model bit-identical (and retryable), or be handled correctly (checked against an independent
reference). ``python tests/test_bad_inputs.py`` runs every case outside pytest and prints the
markdown table of ``docs/bad_inputs.md`` with the measured outcome of each.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import spear_compile  # noqa: E402
from spear_compile import CompensatedLinear, QuantConfig, QuantizedWeight, SpearError  # noqa: E402
from spear_compile import cli  # noqa: E402
from spear_compile.ec.io import load_ecs, model_identity, save_ecs  # noqa: E402
from spear_compile.evaluate import evaluate  # noqa: E402
from spear_compile.quant.io import load_quantized, save_quantized  # noqa: E402
from test_ec_helpers import save_tiny, tiny_llama, wrap_random_ec  # noqa: E402


# ---- the harness ---------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    klass: str
    what: str
    expect: str            # "refused" | "handled"
    run: Callable


CASES: List[Case] = []


def case(klass: str, what: str, expect: str = "refused"):
    def deco(fn):
        CASES.append(Case(fn.__name__.removeprefix("case_"), klass, what, expect, fn))
        return fn
    return deco


class SilentWrong(AssertionError):
    """A result that is wrong without any error."""


class ModelModified(AssertionError):
    """A failed call changed the model."""


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(model: nn.Module) -> dict:
    """Every state tensor's type, dtype, shape and bytes (a QuantizedWeight's inner tensors), the module classes,
    the training flag."""
    out = {"__classes__": [(n, type(m).__name__) for n, m in model.named_modules()], "__training__": model.training,
           "__hf_quantized__": (getattr(model, "hf_quantizer", None) is not None,
                                hasattr(getattr(model, "config", None), "quantization_config"))}
    for k, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, QuantizedWeight):
            out[k] = ("qw", t.bits, t.group_size, t.symmetric, tuple(t.shape),
                      *[(str(p.dtype), tuple(p.shape), _bytes(p)) for p in (t.qdata, t.scale, t.zero)])
        else:
            out[k] = (type(t).__name__, str(t.dtype), tuple(t.shape), _bytes(t))
    return out


def refused(fn: Callable, *fragments: str, model: nn.Module = None) -> str:
    """``fn()`` raises SpearError whose message holds every fragment (case-insensitive); ``model`` unchanged."""
    before = snapshot(model) if model is not None else None
    try:
        fn()
    except SpearError as e:
        msg = str(e)
    else:
        raise SilentWrong(f"no error raised (expected one mentioning {fragments})")
    for f in fragments:
        assert f.lower() in msg.lower(), f"message {msg!r} does not mention {f!r}"
    if model is not None and snapshot(model) != before:
        raise ModelModified(f"the failed call changed the model ({msg})")
    return msg


def run_cli(argv, fragments=(), forbid=()) -> str:
    """``spear-compile argv`` in process: exit status 2, the last stderr line ``spear-compile...: error: ...``
    holding every fragment, no traceback; ``forbid``: functions patched to fail if reached (work done before the error)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        for obj, attr in forbid:
            stack.enter_context(_patched(obj, attr, _must_not_run(attr)))
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli.main([str(a) for a in argv])
            except SystemExit as e:  # argparse usage errors
                code = e.code
    text = err.getvalue()
    assert "Traceback" not in text, text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert code == 2, f"exit status {code}, stderr {text[-500:]!r}"
    assert lines and re.match(r"^spear-compile( \w+)?: error: ", lines[-1]), text[-500:]
    for f in fragments:
        assert f.lower() in lines[-1].lower(), f"{lines[-1]!r} does not mention {f!r}"
    return lines[-1]


def _must_not_run(name):
    def boom(*a, **k):
        raise AssertionError(f"{name} ran before the input error was reported")
    return boom


@contextlib.contextmanager
def _patched(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


# ---- the world the cases run in (built once) -----------------------------------------------------
EC_MODULE = "model.layers.0.mlp.down_proj"


class World:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.model_dir = save_tiny(tmp / "tiny")
        self.text = tmp / "text.txt"
        self.text.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
        self.latin1 = tmp / "latin1.txt"
        self.latin1.write_bytes("caf\xe9 na\xefve r\xe9sum\xe9 ".encode("latin-1") * 50)
        self.empty = tmp / "empty.txt"
        self.empty.write_text(" \n\n")
        self.ec_pc = self._ecs("w4-pc-rtn", tmp / "ec_pc")
        self.ec_g32 = self._ecs("w4-g32-rtn", tmp / "ec_g32")
        q = self.quantized("w4-g32-rtn")
        self.qfile = save_quantized(q, tmp / "q.safetensors", "w4-g32-rtn")

    def fp(self, dtype=torch.bfloat16) -> nn.Module:
        return tiny_llama(dtype=dtype)

    def quantized(self, spec="w4-pc-rtn", dtype=torch.bfloat16) -> nn.Module:
        return spear_compile.quantize(self.fp(dtype), spec, progress=False)

    def _ecs(self, spec, out):
        model = self.quantized(spec)
        wrap_random_ec(model, EC_MODULE, 4, "sigmoid", seed=1)
        save_ecs(model, out, {"quant": QuantConfig.from_spec(spec).to_dict(), "base_model": model_identity(model)})
        return out

    def copy_dir(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return dst

    def rewrite_ecs(self, name: str, edit) -> Path:
        """A copy of the pc EC dir with its tensors edited by ``edit(dict)`` and the checksum updated (a
        well-formed file with bad content)."""
        from safetensors.torch import load_file, save_file

        from spear_compile.ec.io import MANIFEST, TENSORS, _sha256
        d = self.copy_dir(self.ec_pc, name)
        tensors = load_file(str(d / TENSORS))
        edit(tensors)
        save_file(tensors, str(d / TENSORS))
        man = json.loads((d / MANIFEST).read_text())
        man["file_sha256"] = _sha256(d / TENSORS)
        (d / MANIFEST).write_text(json.dumps(man))
        return d

    def edit_manifest(self, name: str, edit) -> Path:
        from spear_compile.ec.io import MANIFEST
        d = self.copy_dir(self.ec_pc, name)
        man = json.loads((d / MANIFEST).read_text())
        man = edit(man) or man
        (d / MANIFEST).write_text(json.dumps(man))
        return d

    def rewrite_qfile(self, name: str, edit_meta=None, edit_tensors=None) -> Path:
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(str(self.qfile), framework="pt") as f:
            meta = json.loads(f.metadata()["spear"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if edit_meta:
            edit_meta(meta)
        if edit_tensors:
            edit_tensors(tensors)
        path = self.tmp / name
        save_file(tensors, str(path), metadata={"spear": json.dumps(meta)})
        return path


# ---- quantize ------------------------------------------------------------------------------------
@case("quantize", "config of the wrong type (an int)")
def case_quantize_config_int(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, 4), "QuantConfig", model=m)


@case("quantize", "unsupported bits in the spec (w5)")
def case_quantize_bits(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "w5-pc-rtn"), "bits=5", model=m)


@case("quantize", "unparsable spec string")
def case_quantize_spec_garbage(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "int4 please"), "not understood", model=m)


@case("quantize", "group size that does not divide K of some linears (g128, K=64)")
def case_quantize_group_not_dividing(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "w4-g128-rtn"), "not divisible by group_size=128", model=m)


@case("quantize", "NaN in the last linear: nothing quantized, retry after the fix works")
def case_quantize_nan_all_or_nothing(w):
    m = w.fp()
    down = m.get_submodule("model.layers.1.mlp.down_proj")
    good = down.weight.data[3, 5].clone()
    down.weight.data[3, 5] = float("nan")
    refused(lambda: spear_compile.quantize(m, "w4-pc-rtn"), "model.layers.1.mlp.down_proj", "NaN", model=m)
    down.weight.data[3, 5] = good
    spear_compile.quantize(m, "w4-pc-rtn")
    assert sum(isinstance(p, QuantizedWeight) for p in m.parameters()) == 14


@case("quantize", "inf in one linear")
def case_quantize_inf(w):
    m = w.fp()
    m.get_submodule("model.layers.0.self_attn.k_proj").weight.data[0, 0] = float("inf")
    refused(lambda: spear_compile.quantize(m, "w4-pc-rtn"), "k_proj", model=m)


@case("quantize", "target that is not a module")
def case_quantize_target_missing(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "w4-pc-rtn", targets=["model.layers.9.mlp"]), "model.layers.9.mlp", model=m)


@case("quantize", "target that is not an nn.Linear (the embedding)")
def case_quantize_target_embedding(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "w4-pc-rtn", targets=["model.embed_tokens"]), "Embedding", model=m)


@case("quantize", "skip= given as one string (would skip by characters)")
def case_quantize_skip_string(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "w4-pc-rtn", skip="lm_head"), "skip", model=m)


@case("quantize", "model that is not an nn.Module")
def case_quantize_not_module(w):
    refused(lambda: spear_compile.quantize({"weight": torch.zeros(2, 2)}, "w4-pc-rtn"), "nn.Module")


@case("quantize", "quantizing an already-quantized model again")
def case_quantize_twice(w):
    m = w.quantized("w4-pc-rtn")
    refused(lambda: spear_compile.quantize(m, "w4-pc-rtn"), "already quantized", model=m)


@case("quantize", "GPTQ without calibration tokens")
def case_gptq_no_calib(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "w4-pc-gptq", progress=False), "calib", model=m)


@case("quantize", "GPTQ with float calibration data")
def case_gptq_float_calib(w):
    m = w.fp()
    refused(lambda: spear_compile.quantize(m, "w4-pc-gptq", calib=torch.rand(2, 32), progress=False), "integer", model=m)


@case("quantize", "GPTQ calibration ids outside the vocabulary")
def case_gptq_calib_vocab(w):
    m = w.fp()
    calib = torch.full((2, 32), 9000, dtype=torch.long)
    refused(lambda: spear_compile.quantize(m, "w4-pc-gptq", calib=calib, progress=False), "vocabulary", model=m)


@case("quantize", "GPTQ failing in its 9th linear: the 8 done are undone, retry works")
def case_gptq_midway_failure(w):
    import spear_compile.quant.gptq as gptq
    m = w.fp()
    calib = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    real, count = gptq.gptq_quantize_weight, [0]

    def flaky(*a, **k):
        count[0] += 1
        if count[0] == 9:
            raise SpearError("injected failure in linear 9")
        return real(*a, **k)
    with _patched(gptq, "gptq_quantize_weight", flaky):
        refused(lambda: spear_compile.quantize(m, "w4-pc-gptq", calib=calib, progress=False), "linear 9", model=m)
    assert count[0] == 9
    spear_compile.quantize(m, "w4-pc-gptq", calib=calib, progress=False)
    assert sum(isinstance(p, QuantizedWeight) for p in m.parameters()) == 14


@case("quantize", "QuantConfig(group_size=48)")
def case_config_group(w):
    refused(lambda: QuantConfig(group_size=48), "group_size=48")


@case("quantize", "QuantConfig(method='awq')")
def case_config_method(w):
    refused(lambda: QuantConfig(method="awq"), "awq")


@case("quantize", "QuantConfig(gptq_damp=0)")
def case_config_damp(w):
    refused(lambda: QuantConfig(gptq_damp=0), "gptq_damp")


# ---- optimize ------------------------------------------------------------------------------------
@case("optimize", "unknown mode")
def case_optimize_mode(w):
    m = w.fp()
    refused(lambda: spear_compile.optimize(m, mode="turbo"), "turbo", model=m)


@case("optimize", "mode= together with options=")
def case_optimize_mode_options(w):
    m = w.fp()
    refused(lambda: spear_compile.optimize(m, mode="max-autotune", options={"a": 1}), "not both", model=m)


@case("optimize", "quant= of the wrong type")
def case_optimize_quant_type(w):
    m = w.fp()
    refused(lambda: spear_compile.optimize(m, quant=4), "quant", model=m)


@case("optimize", "ec= directory that does not exist: model not quantized")
def case_optimize_bad_ec(w):
    m = w.fp()
    refused(lambda: spear_compile.optimize(m, "w4-pc-rtn", ec=str(w.tmp / "nope")), "nope", model=m)


@case("optimize", "ec= of another granularity than quant=: model not quantized")
def case_optimize_ec_granularity(w):
    m = w.fp()
    refused(lambda: spear_compile.optimize(m, "w4-g32-rtn", ec=str(w.ec_pc)), "granularity", model=m)


@case("optimize", "ec= naming a module the model lacks: model not quantized")
def case_optimize_ec_module(w):
    d = w.edit_manifest("ec_badmod", lambda man: man["modules"].update({"model.layers.7.mlp.up_proj": man["modules"][EC_MODULE]}))
    m = w.fp()
    refused(lambda: spear_compile.optimize(m, "w4-pc-rtn", ec=str(d)), "model.layers.7.mlp.up_proj", model=m)


@case("optimize", "GPTQ ECs fitted on other calibration samples: found after quantizing, all undone")
def case_optimize_gptq_rollback(w):
    calib_a = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    calib_b = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(1))
    q = spear_compile.quantize(w.fp(), "w4-pc-gptq", calib=calib_a, progress=False)
    par, _, leaf = EC_MODULE.rpartition(".")
    setattr(q.get_submodule(par), leaf, CompensatedLinear.wrap(q.get_submodule(EC_MODULE), 4, "none"))
    d = w.tmp / "ec_gptq"
    save_ecs(q, d, {"quant": QuantConfig.from_spec("w4-pc-gptq").to_dict(), "base_model": model_identity(q)})
    m = w.fp()
    refused(lambda: spear_compile.optimize(m, "w4-pc-gptq", ec=str(d), calib=calib_b), "different quantized weights",
            model=m)
    spear_compile.optimize(m, "w4-pc-gptq", ec=str(d), calib=calib_a)  # the retry with the right samples works
    assert isinstance(m.get_submodule(EC_MODULE), CompensatedLinear)


@case("optimize", "conflicting quant= on an already-quantized model (silently ignored before)")
def case_optimize_conflicting_quant(w):
    m = w.quantized("w4-pc-rtn")
    refused(lambda: spear_compile.optimize(m, "w4-g32-rtn"), "conflicts", model=m)


@case("optimize", "ec= without quant=")
def case_optimize_ec_no_quant(w):
    m = w.quantized("w4-pc-rtn")
    refused(lambda: spear_compile.optimize(m, quant=None, ec=str(w.ec_pc)), "needs quant", model=m)


@case("optimize", "model that is not an nn.Module")
def case_optimize_not_module(w):
    refused(lambda: spear_compile.optimize(lambda x: x), "nn.Module")


# ---- load_ecs ------------------------------------------------------------------------------------
@case("load_ecs", "directory that does not exist")
def case_ecs_missing_dir(w):
    m = w.quantized()
    refused(lambda: load_ecs(m, w.tmp / "missing", "w4-pc-rtn"), "missing", model=m)


@case("load_ecs", "manifest that is not JSON")
def case_ecs_manifest_not_json(w):
    d = w.copy_dir(w.ec_pc, "ec_notjson")
    (d / "manifest.json").write_text("{not json")
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "manifest.json", model=m)


@case("load_ecs", "manifest that is not UTF-8")
def case_ecs_manifest_latin1(w):
    d = w.copy_dir(w.ec_pc, "ec_latin1")
    (d / "manifest.json").write_bytes(b'{"format": "caf\xe9"}')
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "UTF-8", model=m)


@case("load_ecs", "manifest that is a JSON list")
def case_ecs_manifest_list(w):
    d = w.copy_dir(w.ec_pc, "ec_list")
    (d / "manifest.json").write_text("[1, 2]")
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "not a spear-ec-v1 manifest", model=m)


@case("load_ecs", "manifest module entry that is not an object")
def case_ecs_manifest_entry(w):
    d = w.edit_manifest("ec_entry", lambda man: man["modules"].update({EC_MODULE: 7}))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), EC_MODULE, model=m)


@case("load_ecs", "manifest 'quant' that is not an object")
def case_ecs_manifest_quant(w):
    d = w.edit_manifest("ec_quant", lambda man: man.update(quant="w4-pc-rtn"))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "quant", model=m)


@case("load_ecs", "tensor file missing")
def case_ecs_no_tensors(w):
    d = w.copy_dir(w.ec_pc, "ec_notensors")
    (d / "ecs.safetensors").unlink()
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "ecs.safetensors", model=m)


@case("load_ecs", "tensor file with a flipped byte (checksum)")
def case_ecs_corrupt(w):
    d = w.copy_dir(w.ec_pc, "ec_corrupt")
    raw = bytearray((d / "ecs.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (d / "ecs.safetensors").write_bytes(bytes(raw))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "corrupt", model=m)


@case("load_ecs", "EC tensors holding NaN (well-formed file, right checksum)")
def case_ecs_nan(w):
    d = w.rewrite_ecs("ec_nan", lambda t: t[f"{EC_MODULE}.ec_B"].view(-1).__setitem__(0, float("nan")))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), f"{EC_MODULE}.ec_B", "NaN", model=m)


@case("load_ecs", "EC tensors holding inf")
def case_ecs_inf(w):
    d = w.rewrite_ecs("ec_inf", lambda t: t[f"{EC_MODULE}.ec_A"].view(-1).__setitem__(3, float("inf")))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), f"{EC_MODULE}.ec_A", model=m)


@case("load_ecs", "EC tensor of an integer dtype")
def case_ecs_int_dtype(w):
    d = w.rewrite_ecs("ec_int", lambda t: t.update({f"{EC_MODULE}.ec_A": t[f"{EC_MODULE}.ec_A"].to(torch.int32)}))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "int32", model=m)


@case("load_ecs", "per-channel ECs loaded with a g32 config (granularity named, not GPTQ)")
def case_ecs_granularity_config(w):
    m = w.quantized("w4-g32-rtn")
    msg = refused(lambda: load_ecs(m, w.ec_pc, "w4-g32-rtn"), "granularity", model=m)
    assert "gptq" not in msg.lower()


@case("load_ecs", "per-channel ECs, pc config, but the model quantized g32")
def case_ecs_granularity_model(w):
    m = w.quantized("w4-g32-rtn")
    msg = refused(lambda: load_ecs(m, w.ec_pc, "w4-pc-rtn"), "group_size=32", "w4-pc-rtn", model=m)
    assert "gptq" not in msg.lower()


@case("load_ecs", "ECs calibrated on another base model")
def case_ecs_other_base(w):
    m = spear_compile.quantize(tiny_llama(hidden=128), "w4-pc-rtn")
    refused(lambda: load_ecs(m, w.ec_pc, "w4-pc-rtn"), "base model", model=m)


@case("load_ecs", "config of the wrong type")
def case_ecs_config_type(w):
    m = w.quantized()
    refused(lambda: load_ecs(m, w.ec_pc, 4), "config", model=m)


@case("load_ecs", "model not quantized")
def case_ecs_unquantized(w):
    m = w.fp()
    refused(lambda: load_ecs(m, w.ec_pc, "w4-pc-rtn"), "not quantized", model=m)


@case("load_ecs", "ECs fitted on other quantized weights (fingerprint)")
def case_ecs_fingerprint(w):
    fp = w.fp()
    fp.get_submodule(EC_MODULE).weight.data.mul_(1.5)
    m = spear_compile.quantize(fp, "w4-pc-rtn")
    refused(lambda: load_ecs(m, w.ec_pc, "w4-pc-rtn"), "different quantized weights", model=m)


@case("load_ecs", "tensor file with a tensor the manifest does not describe")
def case_ecs_extra_tensor(w):
    d = w.rewrite_ecs("ec_extra", lambda t: t.update({"model.layers.1.mlp.up_proj.ec_A": torch.zeros(2, 64)}))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "not described", model=m)


@case("load_ecs", "loading the same ECs twice")
def case_ecs_twice(w):
    m = w.quantized()
    load_ecs(m, w.ec_pc, "w4-pc-rtn")
    refused(lambda: load_ecs(m, w.ec_pc, "w4-pc-rtn"), "CompensatedLinear", model=m)


@case("load_ecs", "rank in the manifest larger than the linear")
def case_ecs_bad_rank(w):
    d = w.edit_manifest("ec_rank", lambda man: man["modules"][EC_MODULE].update(rank=10_000))
    m = w.quantized()
    refused(lambda: load_ecs(m, d, "w4-pc-rtn"), "rank", model=m)


# ---- load_quantized / save_quantized -------------------------------------------------------------
@case("load_quantized", "file that does not exist")
def case_q_missing(w):
    m = w.fp()
    refused(lambda: load_quantized(m, w.tmp / "none.safetensors"), "does not exist", model=m)


@case("load_quantized", "file that is not safetensors")
def case_q_garbage(w):
    p = w.tmp / "garbage.safetensors"
    p.write_bytes(b"\x00\x01hello" * 100)
    m = w.fp()
    refused(lambda: load_quantized(m, p), "garbage.safetensors", model=m)


@case("load_quantized", "truncated file")
def case_q_truncated(w):
    p = w.tmp / "trunc.safetensors"
    p.write_bytes(w.qfile.read_bytes()[:5000])
    m = w.fp()
    refused(lambda: load_quantized(m, p), "trunc.safetensors", model=m)


@case("load_quantized", "plain safetensors without spear metadata")
def case_q_no_meta(w):
    from safetensors.torch import save_file
    p = w.tmp / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    m = w.fp()
    refused(lambda: load_quantized(m, p), "no spear metadata", model=m)


@case("load_quantized", "metadata that is not JSON")
def case_q_meta_json(w):
    from safetensors.torch import save_file
    p = w.tmp / "badmeta.safetensors"
    save_file({"a": torch.zeros(2)}, str(p), metadata={"spear": "{oops"})
    m = w.fp()
    refused(lambda: load_quantized(m, p), "corrupt metadata", model=m)


@case("load_quantized", "a tensor changed (checksum)")
def case_q_checksum(w):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"] + 1
    p = w.rewrite_qfile("q_checksum.safetensors", edit_tensors=edit)
    m = w.fp()
    refused(lambda: load_quantized(m, p), "checksum", model=m)


@case("load_quantized", "metadata says 2-bit, codes are 4-bit")
def case_q_meta_bits(w):
    p = w.rewrite_qfile("q_bits.safetensors", edit_meta=lambda meta: meta["modules"][EC_MODULE].update(bits=2))
    m = w.fp()
    refused(lambda: load_quantized(m, p), "bits=2", model=m)


@case("load_quantized", "metadata dtype disagrees with the scales")
def case_q_meta_dtype(w):
    p = w.rewrite_qfile("q_dtype.safetensors", edit_meta=lambda meta: meta["modules"][EC_MODULE].update(dtype="float16"))
    m = w.fp(torch.float16)
    refused(lambda: load_quantized(m, p), "float16", model=m)


@case("load_quantized", "metadata says symmetric, zeros are not")
def case_q_meta_sym(w):
    p = w.rewrite_qfile("q_sym.safetensors", edit_meta=lambda meta: meta["modules"][EC_MODULE].update(symmetric=True))
    m = w.fp()
    refused(lambda: load_quantized(m, p), "symmetric", model=m)


@case("load_quantized", "metadata group size that does not match the scales")
def case_q_meta_group(w):
    p = w.rewrite_qfile("q_group.safetensors", edit_meta=lambda meta: meta["modules"][EC_MODULE].update(group_size=64))
    m = w.fp()
    refused(lambda: load_quantized(m, p), "scale", model=m)


@case("load_quantized", "malformed module metadata")
def case_q_meta_malformed(w):
    p = w.rewrite_qfile("q_malformed.safetensors", edit_meta=lambda meta: meta["modules"].update({EC_MODULE: "w4"}))
    m = w.fp()
    refused(lambda: load_quantized(m, p), EC_MODULE, model=m)


@case("load_quantized", "bf16 file into a float32 model")
def case_q_other_dtype(w):
    m = w.fp(torch.float32)
    refused(lambda: load_quantized(m, w.qfile), "float32", "bfloat16", model=m)


@case("load_quantized", "file of another architecture size")
def case_q_other_arch(w):
    m = tiny_llama(hidden=128)
    refused(lambda: load_quantized(m, w.qfile), "shape", model=m)


@case("load_quantized", "into an already-quantized model")
def case_q_into_quantized(w):
    m = w.quantized("w4-g32-rtn")
    refused(lambda: load_quantized(m, w.qfile), "already quantized", model=m)


@case("load_quantized", "path of the wrong type")
def case_q_path_type(w):
    m = w.fp()
    refused(lambda: load_quantized(m, 42), "path", model=m)


@case("load_quantized", "save_quantized of a model with no quantized linear")
def case_q_save_unquantized(w):
    refused(lambda: save_quantized(w.fp(), w.tmp / "x.safetensors"), "quantize it first")


# ---- QuantizedWeight -----------------------------------------------------------------------------
def _qw(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return QuantizedWeight.from_float((torch.randn(48, 64, generator=g) * 0.1).to(dtype), 4, 32)


@case("QuantizedWeight", ".to(torch.float16) converts (was: dtype silently ignored)", "handled")
def case_qw_to_half(w):
    qw = _qw()
    h = qw.to(torch.float16)
    if h.dtype != torch.float16 or h.scale.dtype != torch.float16:
        raise SilentWrong(f".to(float16) gave {h.dtype}")
    ref = ((qw.codes().double() - qw.zero.double().repeat_interleave(32, 1))
           * qw.scale.to(torch.float16).double().repeat_interleave(32, 1))
    assert torch.equal(h.dequantize(torch.float64), ref) and torch.equal(h.codes(), qw.codes())


@case("QuantizedWeight", "model.half() on a quantized model: outputs match a float16 reference", "handled")
def case_qw_model_half(w):
    m = nn.Sequential(nn.Linear(64, 48, bias=False, dtype=torch.bfloat16))
    spear_compile.quantize(m, "w4-g32-rtn")
    ref_w = m[0].weight.to(torch.float16).dequantize(torch.float64)
    m.half()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).half()
    y = m(x)
    if y.dtype != torch.float16 or m[0].weight.scale.dtype != torch.float16:
        raise SilentWrong("half() left the quantized weight in bf16")
    torch.testing.assert_close(y.double(), x.double() @ ref_w.t(), rtol=2e-3, atol=2e-3)


@case("QuantizedWeight", ".to(torch.int8)")
def case_qw_to_int(w):
    refused(lambda: _qw().to(torch.int8), "int8")


@case("QuantizedWeight", ".to(float16) of scales that overflow float16")
def case_qw_overflow(w):
    qw = QuantizedWeight.from_float(torch.full((4, 32), 1e30, dtype=torch.float32), 4, None)
    refused(lambda: qw.to(torch.float16), "overflow")


@case("QuantizedWeight", "transpose of a packed weight")
def case_qw_transpose(w):
    refused(lambda: _qw().t(), "transposing")


@case("QuantizedWeight", "input with the wrong number of features")
def case_qw_input_features(w):
    refused(lambda: F.linear(torch.randn(2, 63, dtype=torch.bfloat16), _qw()), "63")


@case("QuantizedWeight", "input of another dtype than the weight")
def case_qw_input_dtype(w):
    refused(lambda: F.linear(torch.randn(2, 64), _qw()), "float32")


@case("QuantizedWeight", "3-D weight to quantize")
def case_qw_3d(w):
    refused(lambda: QuantizedWeight.from_float(torch.randn(2, 4, 32)), "2-D")


# ---- evaluate / calibrate API --------------------------------------------------------------------
@case("evaluate", "seq_len as a string")
def case_eval_seq_len_str(w):
    refused(lambda: evaluate(w.model_dir, w.text, seq_len="64", device="cpu"), "seq_len")


@case("evaluate", "quant of the wrong type")
def case_eval_quant_type(w):
    refused(lambda: evaluate(w.model_dir, w.text, quant=4, device="cpu"), "QuantConfig")


@case("calibrate", "steps=1.5")
def case_cal_steps_float(w):
    refused(lambda: spear_compile.calibrate(w.fp(), calib=w.text, steps=1.5, device="cpu"), "steps")


@case("calibrate", "negative learning rate")
def case_cal_lr(w):
    refused(lambda: spear_compile.calibrate(w.fp(), calib=w.text, lr=-1e-3, device="cpu"), "lr")


@case("calibrate", "out_dir is an existing file")
def case_cal_out_file(w):
    f = w.tmp / "afile"
    f.write_text("x")
    refused(lambda: spear_compile.calibrate(w.fp(), calib=w.text, out_dir=f, device="cpu"), "afile")


@case("calibrate", "failing after the diagnostic (rank too large): the caller's model untouched")
def case_cal_late_failure(w):
    m = w.fp()
    m.train()
    calib = torch.randint(0, 8192, (4, 16), generator=torch.Generator().manual_seed(0))
    refused(lambda: spear_compile.calibrate(m, calib=calib, rank=65, placement="random", steps=0, n_windows=4,
                                            seq_len=16, device="cpu", progress=False, batch_size=2),
            "rank=65", model=m)


@case("API types", "inspect(m='1')")
def case_api_inspect_m(w):
    m = w.quantized()
    refused(lambda: spear_compile.inspect(m, m="1"), "inspect: m", model=m)


@case("API types", "calibrate(budget='0.01')")
def case_api_cal_budget_str(w):
    refused(lambda: spear_compile.calibrate(w.fp(), calib=w.text, budget="0.01", device="cpu"), "budget")


@case("API types", "evaluate(device=5)")
def case_api_eval_device_int(w):
    refused(lambda: evaluate(w.model_dir, w.text, device=5), "device")


@case("API types", "load_ecs(ec_dir=3)")
def case_api_ecs_dir_int(w):
    m = w.quantized()
    refused(lambda: load_ecs(m, 3, "w4-pc-rtn"), "ec_dir", model=m)


# ---- CLI (in process) ----------------------------------------------------------------------------
def _eval(w, *extra):
    return ["eval", "--model", w.model_dir, "--data", w.text, "--seq-len", "64", "--max-windows", "2",
            "--device", "cpu", "--no-progress", *extra]


def _no_work():
    import spear_compile.evaluate as ev
    return [(ev, "perplexity"), (ev, "quantize")]


@case("CLI eval", "--quant garbage")
def case_cli_quant(w):
    run_cli(_eval(w, "--quant", "w4-xyz"), ["w4-xyz"], forbid=_no_work())


@case("CLI eval", "--seq-len 0")
def case_cli_seq_zero(w):
    run_cli(_eval(w, "--seq-len", "0"), ["--seq-len"])


@case("CLI eval", "--seq-len abc")
def case_cli_seq_abc(w):
    run_cli(_eval(w, "--seq-len", "abc"), ["abc"])


@case("CLI eval", "--seq-len beyond the model's positions (silent before)")
def case_cli_seq_positions(w):
    run_cli(_eval(w, "--seq-len", "512"), ["max_position_embeddings=128"], forbid=_no_work())


@case("CLI eval", "--max-windows 0")
def case_cli_max_windows(w):
    run_cli(_eval(w, "--max-windows", "0"), ["--max-windows"])


@case("CLI eval", "--batch-size -3")
def case_cli_batch(w):
    run_cli(_eval(w, "--batch-size", "-3"), ["--batch-size"])


@case("CLI eval", "--device bogus")
def case_cli_device_bogus(w):
    run_cli(_eval(w, "--device", "bogus"), ["bogus"], forbid=_no_work())


@case("CLI eval", "--device cuda:99")
def case_cli_device_index(w):
    run_cli(_eval(w, "--device", "cuda:99"), ["cuda:99"], forbid=_no_work())


@case("CLI eval", "--device tpu")
def case_cli_device_tpu(w):
    run_cli(_eval(w, "--device", "tpu"), ["tpu"], forbid=_no_work())


@case("CLI eval", "--data missing")
def case_cli_data_missing(w):
    run_cli(_eval(w, "--data", w.tmp / "nodata.txt"), ["nodata.txt"], forbid=_no_work())


@case("CLI eval", "--data not UTF-8")
def case_cli_data_latin1(w):
    run_cli(_eval(w, "--data", w.latin1), ["latin1.txt", "UTF-8"], forbid=_no_work())


@case("CLI eval", "--data empty")
def case_cli_data_empty(w):
    run_cli(_eval(w, "--data", w.empty), ["empty"], forbid=_no_work())


@case("CLI eval", "--data is a directory")
def case_cli_data_dir(w):
    run_cli(_eval(w, "--data", w.tmp), [str(w.tmp)], forbid=_no_work())


@case("CLI eval", "--model with a corrupt config.json")
def case_cli_model_corrupt(w):
    d = w.copy_dir(w.model_dir, "corrupt_model")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    run_cli(_eval(w, "--model", d), ["config.json"], forbid=_no_work())


@case("CLI eval", "--model whose config.json is not UTF-8")
def case_cli_model_latin1(w):
    d = w.copy_dir(w.model_dir, "latin1_model")
    (d / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}')
    run_cli(_eval(w, "--model", d), ["UTF-8"], forbid=_no_work())


@case("CLI eval", "--model whose config has no model_type")
def case_cli_model_no_type(w):
    d = w.copy_dir(w.model_dir, "notype_model")
    (d / "config.json").write_text('{"hidden_size": 64}')
    run_cli(_eval(w, "--model", d), ["model_type"], forbid=_no_work())


@case("CLI eval", "--model with an unknown model_type")
def case_cli_model_unknown_type(w):
    d = w.copy_dir(w.model_dir, "unknown_model")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (d / "config.json").write_text(json.dumps(cfg))
    run_cli(_eval(w, "--model", d), ["unknown_model"], forbid=_no_work())


@case("CLI eval", "--model with a truncated weights file")
def case_cli_model_weights(w):
    d = w.copy_dir(w.model_dir, "truncw_model")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    run_cli(_eval(w, "--model", d), ["truncw_model"], forbid=_no_work())


@case("CLI eval", "--model directory without config.json")
def case_cli_model_dir(w):
    run_cli(_eval(w, "--model", w.tmp), ["config.json"], forbid=_no_work())


@case("CLI eval", "--ec directory missing: refused before any perplexity pass")
def case_cli_ec_missing(w):
    run_cli(_eval(w, "--ec", w.tmp / "no_ecs"), ["no_ecs"], forbid=_no_work())


@case("CLI eval", "--ec of another granularity: refused before any perplexity pass")
def case_cli_ec_granularity(w):
    run_cli(_eval(w, "--quant", "w4-g32-rtn", "--ec", w.ec_pc), ["granularity"], forbid=_no_work())


@case("CLI eval", "--ec for another base model: refused before any perplexity pass")
def case_cli_ec_base(w):
    d = w.edit_manifest("ec_otherbase", lambda man: man["base_model"].update(config_hash="0" * 16))
    run_cli(_eval(w, "--ec", d), ["base model"], forbid=_no_work())


@case("CLI eval", "--ec with NaN ECs: refused before any perplexity pass")
def case_cli_ec_nan(w):
    d = w.rewrite_ecs("ec_cli_nan", lambda t: t[f"{EC_MODULE}.ec_B"].view(-1).__setitem__(1, float("nan")))
    run_cli(_eval(w, "--ec", d), ["NaN"], forbid=_no_work())


@case("CLI eval", "--quant none with --ec")
def case_cli_none_ec(w):
    run_cli(_eval(w, "--quant", "none", "--ec", w.ec_pc), ["--ec"], forbid=_no_work())


@case("CLI eval", "--calib not UTF-8 with GPTQ")
def case_cli_calib_latin1(w):
    run_cli(_eval(w, "--quant", "w4-pc-gptq", "--calib", w.latin1), ["UTF-8"], forbid=_no_work())


@case("CLI calibrate", "--out is an existing file")
def case_cli_cal_out_file(w):
    f = w.tmp / "outfile"
    f.write_text("x")
    run_cli(["calibrate", "--model", w.model_dir, "--calib", w.text, "--out", f, "--device", "cpu"], ["outfile"])


@case("CLI calibrate", "--out below a file (cannot be created)")
def case_cli_cal_out_under_file(w):
    f = w.tmp / "outfile2"
    f.write_text("x")
    run_cli(["calibrate", "--model", w.model_dir, "--calib", w.text, "--out", f / "sub", "--device", "cpu"], ["sub"])


@case("CLI calibrate", "--budget 2")
def case_cli_cal_budget(w):
    run_cli(["calibrate", "--model", w.model_dir, "--calib", w.text, "--out", w.tmp / "o", "--budget", "2"], ["budget"])


@case("CLI calibrate", "--steps -1")
def case_cli_cal_steps(w):
    run_cli(["calibrate", "--model", w.model_dir, "--calib", w.text, "--out", w.tmp / "o", "--steps", "-1"], ["steps"])


@case("CLI calibrate", "--calib missing")
def case_cli_cal_calib(w):
    run_cli(["calibrate", "--model", w.model_dir, "--calib", w.tmp / "nocalib.txt", "--out", w.tmp / "o"], ["nocalib.txt"])


@case("CLI calibrate", "--device bogus")
def case_cli_cal_device(w):
    run_cli(["calibrate", "--model", w.model_dir, "--calib", w.text, "--out", w.tmp / "o", "--device", "bogus"], ["bogus"])


@case("CLI calibrate", "--seq-len beyond the model's positions")
def case_cli_cal_seq(w):
    run_cli(["calibrate", "--model", w.model_dir, "--calib", w.text, "--out", w.tmp / "o", "--device", "cpu",
             "--seq-len", "256", "--no-progress"], ["max_position_embeddings"])


@case("CLI inspect", "--quant garbage")
def case_cli_inspect_quant(w):
    run_cli(["inspect", "--model", w.model_dir, "--quant", "w9-pc-rtn", "--device", "cpu"], ["bits=9"])


@case("CLI inspect", "--device bogus")
def case_cli_inspect_device(w):
    run_cli(["inspect", "--model", w.model_dir, "--device", "bogus"], ["bogus"])


@case("CLI inspect", "--ec missing")
def case_cli_inspect_ec(w):
    run_cli(["inspect", "--model", w.model_dir, "--device", "cpu", "--ec", w.tmp / "noec"], ["noec"])


@case("CLI inspect", "--model missing")
def case_cli_inspect_model(w):
    run_cli(["inspect", "--model", w.tmp / "nomodel", "--device", "cpu"], ["nomodel"])


@case("CLI", "unknown subcommand")
def case_cli_subcommand(w):
    run_cli(["frobnicate"], ["frobnicate"])


# ---- pytest --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c, world):
    c.run(world)


def test_at_least_60_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 60


# ---- the table ------------------------------------------------------------------------------------
def outcome(c: Case, w: World) -> str:
    try:
        c.run(w)
    except SilentWrong as e:
        return f"SILENT WRONG RESULT ({e})"
    except ModelModified as e:
        return f"MODEL LEFT MODIFIED ({e})"
    except AssertionError as e:
        return f"UNCLEAR ({str(e)[:120]})"
    except Exception as e:  # noqa: BLE001
        return f"TRACEBACK ({type(e).__name__}: {traceback.format_exception_only(e)[-1].strip()[:120]})"
    if c.expect == "handled":
        return "handled correctly"
    return "clear error, exit 2" if c.klass.startswith("CLI") else "clear error, model unchanged"


def main() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory() as tmp:
        w = World(Path(tmp))
        rows = [(c, outcome(c, w)) for c in CASES]
    bad = [r for _, r in rows if not r.startswith(("clear error", "handled"))]
    import torch as _torch
    import transformers as _tf
    print(f"Measured with `python tests/test_bad_inputs.py` (torch {_torch.__version__}, transformers {_tf.__version__}). "
          "'model unchanged': the state dict (every tensor's bytes, QuantizedWeight inner tensors included), the module "
          "classes and the training flag are identical after the failed call.\n")
    print("| # | class | bad input | outcome |\n| ---: | --- | --- | --- |")
    for i, (c, r) in enumerate(rows, 1):
        print(f"| {i} | {c.klass} | {c.what} | {r} |")
    by = {}
    for c, r in rows:
        by.setdefault(c.klass, []).append(r.startswith(("clear error", "handled")))
    print("\n| class | cases | ok |\n| --- | ---: | ---: |")
    for k, v in by.items():
        print(f"| {k} | {len(v)} | {sum(v)} |")
    print(f"\n{len(rows)} cases: {len(rows) - len(bad)} ok, "
          f"{sum(r.startswith('TRACEBACK') for r in bad)} tracebacks, "
          f"{sum(r.startswith('SILENT') for r in bad)} silent wrong results, "
          f"{sum(r.startswith('MODEL') for r in bad)} models left modified, "
          f"{sum(r.startswith('UNCLEAR') for r in bad)} unclear")


if __name__ == "__main__":
    main()
