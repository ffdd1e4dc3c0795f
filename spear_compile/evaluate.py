"""Perplexity evaluation of a model before and after quantization (and with ECs attached).

``evaluate()`` loads a Hugging Face causal LM in bf16, measures FP perplexity, quantizes it
(GPTQ calibrates on ``calib_path``), measures again, optionally loads ECs and measures once more.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import torch

from .checks import (check_device, check_int, check_model_dir, check_path, check_seq_len, load_causal_lm,
                     load_tokenizer, read_text)
from .quant.config import QuantConfig
from .ec.module import CompensatedLinear
from .errors import SpearError
from .quant.memory import model_bytes
from .perplexity import perplexity, tokenize_file, windows
from .quant.api import as_config, quantize

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "spear-ref-16m"
DEFAULT_DATA = ASSETS / "wikitext2_test.txt"
DEFAULT_CALIB = ASSETS / "calib.txt"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_path: Union[str, Path], device: str, dtype=torch.bfloat16):
    """``(model, tokenizer)`` from a Hugging Face directory, in ``dtype`` on ``device``, eval mode."""
    model = load_causal_lm(model_path, dtype, device)
    return model, load_tokenizer(model_path)


def calibration_tokens(tokenizer, calib_path: Union[str, Path], nsamples: int, seq_len: int,
                       seed: int = 0) -> torch.Tensor:
    """``[nsamples, seq_len]`` random segments of the calibration text (seeded)."""
    if nsamples < 1:
        raise SpearError(f"calibration: nsamples must be >= 1, got {nsamples}")
    ids = tokenize_file(tokenizer, calib_path)
    if ids.numel() < seq_len:
        raise SpearError(f"calibration file {str(calib_path)!r}: {ids.numel()} tokens is shorter than one segment "
                         f"of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def evaluate(model_path: Union[str, Path, None] = None, data_path: Union[str, Path, None] = None,
             quant: Union[str, QuantConfig, None] = "w4-pc-rtn", seq_len: int = 512,
             max_windows: Optional[int] = None, ec_dir: Union[str, Path, None] = None, batch_size: int = 8,
             device: Optional[str] = None, progress: bool = True, calib_path: Union[str, Path, None] = None,
             nsamples: int = 128, fp: bool = True) -> dict:
    """Perplexities and bytes of FP vs quantized (vs quantized + EC) model on ``data_path``.

    ``quant``: spec string, ``QuantConfig`` or ``"none"``. ``fp=False`` skips the FP pass
    (``fp_ppl`` is then None). Returns a flat JSON-able dict.
    """
    # every argument and file is checked here, before the model is loaded or any perplexity pass runs
    model_path = check_model_dir(model_path or DEFAULT_MODEL)
    data_path = check_path(data_path or DEFAULT_DATA, "data")
    calib_path = check_path(calib_path or DEFAULT_CALIB, "calib")
    device = str(check_device(device or default_device()))
    config = as_config(quant, "evaluate")
    check_int(seq_len, "evaluate: seq_len")
    check_int(batch_size, "evaluate: batch_size")
    check_int(max_windows, "evaluate: max_windows", allow_none=True)
    check_int(nsamples, "evaluate: nsamples")
    if ec_dir is not None and config is None:
        raise SpearError("evaluate: --ec needs a quantized model (quant is 'none')")
    read_text(data_path, "data file")
    if config is not None and config.method == "gptq":
        read_text(calib_path, "calibration file")
    if ec_dir is not None:
        from .ec.io import check_ec_dir

        check_ec_dir(ec_dir, config)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    t0 = time.time()
    model, tokenizer = load_model(model_path, device)
    check_seq_len(model, seq_len, "evaluate: seq_len")
    if ec_dir is not None:  # the model-dependent EC checks, before the perplexity passes
        from .ec.io import check_ecs_before_quantizing

        check_ecs_before_quantizing(model, ec_dir, config)
    wins = windows(tokenize_file(tokenizer, data_path), seq_len, max_windows, source=str(data_path))
    out = dict(model=str(model_path), data=str(data_path), quant=config.spec if config else "none",
               seq_len=seq_len, windows=int(wins.shape[0]), tokens=int(wins[:, 1:].numel()),
               device=str(device), dtype="bfloat16")
    fp_bytes = model_bytes(model)["total"]
    out["fp_ppl"] = perplexity(model, wins, batch_size, progress, desc="ppl fp") if fp else None

    if config is None:
        out.update(quant_ppl=out["fp_ppl"], model_bytes_fp=fp_bytes, model_bytes_quant=fp_bytes,
                   quantized_weight_bytes=0, quantized_weight_bytes_nominal=0)
    else:
        calib = None
        if config.method == "gptq":
            calib = calibration_tokens(tokenizer, calib_path, nsamples, seq_len)
            out.update(calib=str(calib_path), nsamples=nsamples)
        tq = time.time()
        quantize(model, config, calib=calib, progress=progress)
        out["quantize_s"] = round(time.time() - tq, 2)
        mb = model_bytes(model)
        out.update(quant_config=config.to_dict(), model_bytes_fp=fp_bytes, model_bytes_quant=mb["total"],
                   quantized_weight_bytes=mb["quantized_weights"],
                   quantized_weight_bytes_nominal=mb["quantized_weights_nominal"])
        out["quant_ppl"] = perplexity(model, wins, batch_size, progress, desc=f"ppl {config.spec}")

    if ec_dir is not None:
        from .ec.io import load_ecs

        manifest = load_ecs(model, ec_dir, config)
        ec_bytes = sum(m.ec_bytes() for m in model.modules() if isinstance(m, CompensatedLinear))
        out["ec_ppl"] = perplexity(model, wins, batch_size, progress, desc="ppl ec")
        out.update(ec_dir=str(ec_dir), ec_bytes=ec_bytes, ec_fraction=ec_bytes / out["model_bytes_quant"],
                   ec_modules=sum(isinstance(m, CompensatedLinear) for m in model.modules()),
                   ec_manifest_keys=sorted(manifest) if isinstance(manifest, dict) else None)
        gap = None if out["fp_ppl"] is None else out["quant_ppl"] - out["fp_ppl"]
        out["gap_recovered"] = (out["quant_ppl"] - out["ec_ppl"]) / gap if gap else None
    out["seconds"] = round(time.time() - t0, 2)
    return out
