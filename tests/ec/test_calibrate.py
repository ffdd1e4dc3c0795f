import argparse
import json

import pytest
import torch

from spear_compile import CompensatedLinear, SpearError, model_bytes, quantize
from spear_compile.ec.cli import add_cli
from spear_compile.ec.pipeline import calibrate
from spear_compile.ec.io import load_ecs

from tests.test_ec_helpers import save_tiny, tiny_llama

KW = dict(n_windows=4, seq_len=16, device="cpu", progress=False, batch_size=2)


def _tokens(seed=0):
    return torch.randint(0, 8192, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_calibrate_fits_budget_trains_and_round_trips(tmp_path):
    fp = tiny_llama()
    model, man = calibrate(fp, "w4-pc-rtn", calib=_tokens(), budget=0.05, rank=4, steps=25, lr=3e-3, init="zero",
                           out_dir=tmp_path, **KW)
    ecs = {n: m for n, m in model.named_modules() if isinstance(m, CompensatedLinear)}
    assert sorted(ecs) == sorted(man["ranks"]) and ecs
    assert man["ec_bytes"] == sum(m.ec_bytes() for m in ecs.values()) <= man["budget_bytes"]
    plain = quantize(tiny_llama(), "w4-pc-rtn")
    assert man["budget_bytes"] == int(0.05 * model_bytes(plain)["total"])
    assert man["loss_last"] < man["loss_first"]
    assert man["quant"]["spec"] == "w4-pc-rtn" and man["gate"] == "sigmoid"
    for f in ("manifest.json", "ecs.safetensors", "diagnostic.json", "diagnostic_heatmap.png", "per_token_error.png"):
        assert (tmp_path / f).stat().st_size > 0
    ranking = json.loads((tmp_path / "diagnostic.json").read_text())["ranking"]
    assert len(ranking) == 14  # 7 linears x 2 layers
    load_ecs(plain, tmp_path, "w4-pc-rtn")
    ids = _tokens(5)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


def test_calibrate_is_deterministic_under_a_seed():
    outs = []
    for _ in range(2):
        model, man = calibrate(tiny_llama(), "w4-pc-rtn", calib=_tokens(), budget=0.05, rank=2, steps=3,
                               placement="random", seed=7, **KW)
        outs.append([p.detach().clone() for m in model.modules() if isinstance(m, CompensatedLinear)
                     for p in m.ec_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_bad_input_fails_clearly(tmp_path):
    for budget in (0, 1, -0.5, 2):
        with pytest.raises(SpearError, match="budget"):
            calibrate(tiny_llama(), calib=_tokens(), budget=budget, **KW)
    with pytest.raises(SpearError, match="calibration"):
        calibrate(tiny_llama(), calib=torch.zeros(0, 16, dtype=torch.long), **KW)
    with pytest.raises(SpearError, match="rank=65"):
        calibrate(tiny_llama(), calib=_tokens(), rank=65, placement="random", steps=0, **KW)
    with pytest.raises(SpearError, match="gate"):
        calibrate(tiny_llama(), calib=_tokens(), gate="tanh", **KW)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    path = save_tiny(tmp_path / "m")
    with pytest.raises(SpearError, match="empty"):
        calibrate(str(path), calib=str(empty), **KW)
    with pytest.raises(SpearError, match="config.json"):
        calibrate(str(tmp_path / "nomodel"), calib=_tokens(), **KW)


def test_cli_writes_ecs_and_manifest(tmp_path, capsys):
    path = save_tiny(tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "ecs"
    args = parser.parse_args(["calibrate", "--model", str(path), "--calib", str(calib), "--budget", "0.05",
                              "--out", str(out), "--gate", "none", "--steps", "2", "--rank", "2", "--device", "cpu",
                              "--seq-len", "32"])  # the tiny model has 128 positions
    assert args.func(args) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["gate"] == "none" and man["budget"] == 0.05 and man["modules"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote") and str(out) in last
    for f in ("ecs.safetensors", "manifest.json", "diagnostic.json", "diagnostic_heatmap.png", "per_token_error.png"):
        assert f in last and (out / f).stat().st_size > 0  # the final line names every file written, plots included


def test_cli_json_and_options(tmp_path, capsys):
    path = save_tiny(tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "ecs"
    args = parser.parse_args(["calibrate", "--model", str(path), "--calib", str(calib), "--budget", "0.05",
                              "--out", str(out), "--steps", "1", "--rank", "2", "--device", "cpu", "--seq-len", "16",
                              "--max-windows", "6", "--no-progress", "--json"])
    capsys.readouterr()  # the setup's own output (save_pretrained's bar)
    assert args.func(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["out"] == str(out) and result["modules"] >= 1
    assert sorted(map(lambda f: f.rsplit("/", 1)[-1], result["files_written"])) == sorted(
        ["ecs.safetensors", "manifest.json", "diagnostic.json", "diagnostic_heatmap.png", "per_token_error.png"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["calib_tokens"] <= 6 * 16  # --max-windows bounds the calibration windows
    assert "it/s" not in captured.err  # --no-progress: no bars


def test_fit_many_records_both_diagnostics_and_follows_the_chosen_score():
    from spear_compile.ec.pipeline import fit, fit_many, prepare
    prep = prepare(tiny_llama(), "w4-pc-rtn", calib=_tokens(), n_windows=4, seq_len=16, n_heldout=1,
                   n_diag_model=2, device="cpu", progress=False)
    s = next(iter(prep.scores.values()))
    for key in ("local_score", "model_score", "kl_gain", "solo_score", "score"):
        assert key in s
    assert prep.model_all["tokens"] == 32
    specs = [dict(budget=0.05, rank=2, score="kl_gain"), dict(budget=0.05, placement="local", rank=2),
             dict(budget=0.05, rank=4, alloc="capture", gate="none"), dict(budget=0.05, placement="random", seed=3)]
    res = fit_many(prep, specs, steps=2, batch_size=2, progress=False)
    assert len(res) == 4
    for (model, man), sp in zip(res, specs):
        assert man["ec_bytes"] <= man["budget_bytes"] and man["fits_trained_together"] == 4
        assert man["kl_heldout"]["with_ecs"] > 0
        assert set(man["scores"][next(iter(man["ranks"]))]) >= {"local_score", "model_score", "kl_gain"}
    top = lambda key: max(prep.scores, key=lambda n: prep.scores[n][key])  # noqa: E731
    assert top("kl_gain") in res[0][1]["ranks"] and res[0][1]["score"] == "kl_gain"
    assert top("local_score") in res[1][1]["ranks"] and res[1][1]["score"] == "local_score"
    assert res[2][1]["alloc"] == "capture" and set(res[2][1]["ranks"].values()) <= {1, 2, 4}
    assert res[3][1]["rank"] == 8  # placements other than the diagnostic default to rank 8
    # one fit alone gives the same ECs as in the stack
    model, man = fit(prep, budget=0.05, rank=2, score="kl_gain", steps=2, batch_size=2, progress=False)
    a = [p for m in model.modules() if isinstance(m, CompensatedLinear) for p in m.ec_parameters()]
    b = [p for m in res[0][0].modules() if isinstance(m, CompensatedLinear) for p in m.ec_parameters()]
    assert all(torch.allclose(x.float(), y.float(), atol=1e-2, rtol=1e-2) for x, y in zip(a, b)) and a
    with pytest.raises(SpearError, match="score"):
        fit_many(prep, [dict(score="best")], steps=1)
    with pytest.raises(SpearError, match="rank allocation"):
        fit_many(prep, [dict(alloc="greedy")], steps=1)
    with pytest.raises(SpearError, match="unknown fit option"):
        fit_many(prep, [dict(per_module=True)], steps=1)
    with pytest.raises(SpearError, match="unknown gate 'norm'"):  # the experimental gates left the library
        fit_many(prep, [dict(gate="norm")], steps=1)


def test_fit_options_balance_gate_init_objective_and_long_windows():
    from spear_compile.ec.pipeline import fit_many, join_windows, prepare
    calib = torch.randint(0, 8192, (8, 16), generator=torch.Generator().manual_seed(0))
    prep = prepare(tiny_llama(), "w4-pc-rtn", calib=calib, n_windows=8, seq_len=16, n_heldout=2,
                   n_diag_model=2, device="cpu", progress=False)
    # held-out full-vocabulary KL on the held-out windows joined into 512-token windows (too few here: as they are)
    assert torch.equal(prep.heldout_long(), prep.heldout) and prep.heldout.shape == (2, 16)
    assert join_windows(torch.arange(12).reshape(4, 3), 6).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    with pytest.raises(SpearError, match="joined"):
        join_windows(torch.zeros(4, 3, dtype=torch.long), 4)
    base = dict(budget=0.05, rank=2)
    specs = [dict(base), dict(base, balance=True), dict(base, gate="none", balance=True),
             dict(base, gate="none", gate_init="random"), dict(base, gate_init="random")]
    res = fit_many(prep, specs, steps=0, progress=False)
    kls = [man["kl_heldout"]["full_with_ecs"] for _, man in res]
    # balancing rescales A and B (same function); a static fit ignores gate_init; a random gate changes g
    tol = 1e-3 * kls[0]
    assert abs(kls[1] - kls[0]) < tol and abs(kls[2] - kls[0]) < tol and abs(kls[3] - kls[0]) < tol
    assert abs(kls[4] - kls[0]) > 2 * tol
    assert res[0][1]["kl_heldout"]["full_quantized"] > 0 and res[0][1]["teacher"] == "cached"
    assert res[4][1]["gate_stats"]["gate_abs_dev"] > 0 and res[2][1]["gate_stats"] is None
    (_, m1), (_, m2) = fit_many(prep, [dict(base, topk=0), dict(base, topk=8, gate="none")], steps=2, batch_size=2,
                                progress=False, seq_len=32)
    assert m1["seq_len"] == 32 and m1["teacher"] == "online" and m1["loss_last"] > 0 and m2["teacher_topk"] == 8
    with pytest.raises(SpearError, match="topk"):
        fit_many(prep, [dict(base, topk=-1)], steps=1)
    with pytest.raises(SpearError, match="gate_init"):
        fit_many(prep, [dict(base, gate_init="ones")], steps=1)


def test_per_config_training_defaults():
    from spear_compile.ec.pipeline import train_defaults
    assert train_defaults("w3-pc-rtn") == dict(steps=1200, lr=2e-3, topk=0)
    assert train_defaults("w4-pc-rtn") == dict(steps=600, lr=1e-3, topk=None)
    _, man = calibrate(tiny_llama(), "w3-pc-rtn", calib=_tokens(), budget=0.05, rank=2, steps=2, **KW)
    assert man["lr"] == 2e-3 and man["topk"] == 0 and man["teacher"] == "online" and man["steps"] == 2
    _, man = calibrate(tiny_llama(), "w3-pc-rtn", calib=_tokens(), budget=0.05, rank=2, steps=1, topk=None, lr=1e-3, **KW)
    assert man["lr"] == 1e-3 and man["teacher"] == "cached" and man["teacher_topk"] == 64


def test_calibrate_runs_only_the_diagnostic_variant_its_score_needs():
    """The default placement ranks by solo_score: `calibrate` skips the restore variant (half the model-level
    forwards) and places exactly as a prepare that computed both variants."""
    from spear_compile.ec.pipeline import fit, prepare
    kw = dict(budget=0.05, rank=2, steps=2, batch_size=2, progress=False)
    model, man = calibrate(tiny_llama(), "w4-pc-rtn", calib=_tokens(), n_windows=4, seq_len=16, device="cpu", **kw)
    some = next(iter(man["scores"].values()))
    assert "solo_score" in some and "model_score" not in some and "kl_gain" not in some
    both = prepare(tiny_llama(), "w4-pc-rtn", calib=_tokens(), n_windows=4, seq_len=16, device="cpu", progress=False)
    _, man_both = fit(both, **kw)
    assert man_both["ranks"] == man["ranks"] and man_both["score"] == man["score"] == "solo_score"
    _, man_kl = calibrate(tiny_llama(), "w4-pc-rtn", calib=_tokens(), n_windows=4, seq_len=16, device="cpu",
                          score="kl_gain", **kw)
    some = next(iter(man_kl["scores"].values()))
    assert "kl_gain" in some and "solo_score" not in some
