"""`spear-compile eval` and the evaluate() harness: JSON output, errors, subcommand registry, EC path."""
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import spear_compile
from spear_compile import CompensatedLinear, SpearError, cli
from spear_compile.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
TEST_TEXT = ROOT / "spear_compile" / "assets" / "wikitext2_test.txt"


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(TEST_TEXT.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


def test_eval_json_is_last_stdout_line(small_text):
    proc = subprocess.run(
        [sys.executable, "-m", "spear_compile.cli", "eval", "--quant", "w4-pc-rtn", "--data", str(small_text),
         "--seq-len", "64", "--max-windows", "2", "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("fp_ppl", "quant_ppl", "model_bytes_fp", "model_bytes_quant", "quant", "seq_len", "windows", "tokens",
                "quantized_weight_bytes", "quantized_weight_bytes_nominal"):
        assert key in result, key
    assert result["quant"] == "w4-pc-rtn" and result["windows"] == 2 and result["tokens"] == 128
    assert math.isfinite(result["quant_ppl"]) and result["quant_ppl"] > 1 and result["fp_ppl"] > 1
    assert result["model_bytes_quant"] < result["model_bytes_fp"] / 2


def test_eval_table_and_gptq(small_text, capsys):
    rc = cli.main(["eval", "--quant", "w4-g128-gptq", "--data", str(small_text), "--calib", str(small_text),
                   "--nsamples", "2", "--seq-len", "64", "--max-windows", "2", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "quant_ppl" in out and "w4-g128-gptq" in out


@pytest.mark.parametrize("argv,match", [
    (["eval", "--quant", "w5-pc-rtn"], "unsupported bits=5"),
    (["eval", "--quant", "w4-pc-rtn", "--data", "/nonexistent/file.txt"], "does not exist"),
    (["eval", "--quant", "w4-pc-rtn", "--model", "/nonexistent/model"], "not a Hugging Face model directory"),
    (["eval", "--quant", "none", "--ec", "/tmp/x"], "needs a quantized model"),
])
def test_spear_error_exits_2_without_traceback(argv, match, capsys):
    assert cli.main(argv + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("spear-compile: error: ") and match in last and "Traceback" not in err


def test_every_subcommand_of_the_table_is_registered():
    help_text = cli.build_parser().format_help()
    assert all(name in help_text for name in ("eval", *cli.SUBCOMMANDS))


def test_subcommands_from_the_table(monkeypatch):
    fake = types.ModuleType("fake_spear_sub")

    def add_cli(subparsers):
        p = subparsers.add_parser("fake")
        p.add_argument("--n", type=int, default=1)
        p.set_defaults(func=lambda args: 7 if args.n == 3 else 0)

    fake.add_cli = add_cli
    monkeypatch.setitem(sys.modules, "fake_spear_sub", fake)
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"fake": "fake_spear_sub"})
    assert cli.main(["fake", "--n", "3"]) == 7
    with pytest.raises(SystemExit):  # not in the table: unknown
        cli.main(["calibrate"])
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"missing": "spear_compile.not_written_yet"})
    with pytest.raises(ModuleNotFoundError):  # a module in the table that does not import is an error, not skipped
        cli.build_parser()


def test_evaluate_with_ecs_reports_recovery(small_text, monkeypatch):
    """EC path through a stand-in ec_io (the real one is written elsewhere): numbers must be consistent."""
    calls = {}

    def load_ecs(model, ec_dir, config):
        calls["config"] = config.spec
        gen = torch.Generator().manual_seed(0)
        name = "model.layers.0.mlp.down_proj"
        parent, _, leaf = name.rpartition(".")
        ec = CompensatedLinear.wrap(model.get_submodule(name), 4, "sigmoid")
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype)
        setattr(model.get_submodule(parent), leaf, ec)
        return {"modules": [name]}

    def check_ec_dir(ec_dir, config):  # the up-front checks evaluate runs before any perplexity pass
        calls.setdefault("order", []).append("check_dir")

    def check_ecs_before_quantizing(model, ec_dir, config):
        assert not any(isinstance(p, spear_compile.QuantizedWeight) for p in model.parameters())
        calls.setdefault("order", []).append("check_model")

    fake = types.ModuleType("spear_compile.ec.io")
    fake.load_ecs = load_ecs
    fake.check_ec_dir, fake.check_ecs_before_quantizing = check_ec_dir, check_ecs_before_quantizing
    monkeypatch.setitem(sys.modules, "spear_compile.ec.io", fake)
    r = evaluate(data_path=small_text, quant="w4-pc-rtn", seq_len=64, max_windows=2, ec_dir="unused", device="cpu",
                 progress=False)
    assert calls["config"] == "w4-pc-rtn" and calls["order"] == ["check_dir", "check_model"]
    ec_bytes = 2 * (4 * 1024 + 384 * 4 + 4 * 4 + 4)
    assert r["ec_bytes"] == ec_bytes and r["ec_modules"] == 1
    assert r["ec_fraction"] == pytest.approx(ec_bytes / r["model_bytes_quant"])
    assert r["ec_ppl"] != r["quant_ppl"]
    assert r["gap_recovered"] == pytest.approx((r["quant_ppl"] - r["ec_ppl"]) / (r["quant_ppl"] - r["fp_ppl"]))


def test_evaluate_validates_options():
    with pytest.raises(SpearError, match="max_windows"):
        evaluate(quant="w4-pc-rtn", max_windows=0, device="cpu")
    with pytest.raises(SpearError, match="batch_size"):
        evaluate(quant="w4-pc-rtn", batch_size=0, device="cpu")


def test_evaluate_with_real_ec_io(small_text, tmp_path):
    """End to end with the project's ec_io: save random ECs for the bundled model, evaluate --ec."""
    ec_io = pytest.importorskip("spear_compile.ec.io")
    from spear_compile import quantize
    from spear_compile.evaluate import DEFAULT_MODEL, load_model

    model, _ = load_model(DEFAULT_MODEL, "cpu")
    quantize(model, "w4-pc-rtn")
    gen = torch.Generator().manual_seed(1)
    for name in ("model.layers.2.self_attn.v_proj", "model.layers.5.mlp.up_proj"):
        parent, _, leaf = name.rpartition(".")
        ec = CompensatedLinear.wrap(model.get_submodule(name), 8, "sigmoid")
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype)
        setattr(model.get_submodule(parent), leaf, ec)
    ec_io.save_ecs(model, tmp_path / "ecs", {"quant": spear_compile_config("w4-pc-rtn"),
                                             "base_model": ec_io.model_identity(model)})
    r = evaluate(data_path=small_text, quant="w4-pc-rtn", seq_len=64, max_windows=2, ec_dir=tmp_path / "ecs",
                 device="cpu", progress=False)
    assert r["ec_modules"] == 2 and r["ec_bytes"] == sum(
        2 * (8 * k + n * 8 + 8 * 8 + 8) for n, k in ((128, 384), (1024, 384)))
    assert math.isfinite(r["ec_ppl"]) and r["gap_recovered"] is not None
    with pytest.raises(SpearError, match="calibrated for"):
        evaluate(data_path=small_text, quant="w4-g128-rtn", seq_len=64, max_windows=1, ec_dir=tmp_path / "ecs",
                 device="cpu", progress=False)


def spear_compile_config(spec):
    from spear_compile import QuantConfig

    return QuantConfig.from_spec(spec).to_dict()
