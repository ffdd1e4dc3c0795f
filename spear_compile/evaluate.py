"""Perplexity evaluation of a model before and after quantization (and with ECs attached).

``evaluate()`` loads a Hugging Face causal LM in bf16, measures FP perplexity, quantizes it
(GPTQ calibrates on ``calib_path``), measures again, optionally loads ECs and measures once more.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import torch

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise SpearError(f"model path {str(path)!r} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def calibration_tokens(tokenizer, calib_path: Union[str, Path], nsamples: int, seq_len: int,
                       seed: int = 0) -> torch.Tensor:
    """``[nsamples, seq_len]`` random segments of the calibration text (seeded)."""
    if nsamples < 1:
        raise SpearError(f"calibration: nsamples must be >= 1, got {nsamples}")
    ids = tokenize_file(tokenizer, calib_path)
    if ids.numel() < seq_len:
        raise SpearError(f"calibration file {str(calib_path)!r}: {ids.numel()} tokens is shorter than one segment of {seq_len}")
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
    model_path = Path(model_path or DEFAULT_MODEL)
    data_path = Path(data_path or DEFAULT_DATA)
    calib_path = Path(calib_path or DEFAULT_CALIB)
    device = device or default_device()
    config = as_config(quant)
    if batch_size < 1:
        raise SpearError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise SpearError(f"evaluate: max_windows must be >= 1, got {max_windows}")
    if ec_dir is not None and config is None:
        raise SpearError("evaluate: --ec needs a quantized model (quant is 'none')")
    for what, path in (("data", data_path), ("calibration", calib_path if config and config.method == "gptq" else None)):
        if path is not None and not path.is_file():
            raise SpearError(f"{what} file {str(path)!r} does not exist")
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    t0 = time.time()
    model, tokenizer = load_model(model_path, device)
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
