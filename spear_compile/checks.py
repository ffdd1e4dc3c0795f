"""Up-front checks of user input, shared by the API and the CLI: each raises ``SpearError`` naming
the option, file or module, before any expensive work starts."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import SpearError


def check_int(value, name: str, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    """``value`` is an int >= ``minimum`` (bools are refused: ``True`` is not a count)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpearError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise SpearError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(value, name: str, low: float, high: float = float("inf"), low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SpearError(f"{name} must be a number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        raise SpearError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def check_device(device, name: str = "device") -> torch.device:
    """A device string that parses and is present on this machine (``cuda`` without a GPU is refused)."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError) as e:
            raise SpearError(f"{name} {device!r} is not a device (expected e.g. cpu, cuda, cuda:0): {e}") from None
    else:
        raise SpearError(f"{name} must be a device string such as 'cpu' or 'cuda', got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpearError(f"{name} {str(dev)!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpearError(f"{name} {str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        avail = getattr(torch, dev.type, None)
        if avail is None or not getattr(avail, "is_available", lambda: False)():
            raise SpearError(f"{name} {str(dev)!r}: that device type is not available here (use cpu or cuda)")
    return dev


def check_path(path, name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise SpearError(f"{name} must be a path, got {type(path).__name__}")
    return Path(path)


def read_text(path: Union[str, Path], what: str = "text file") -> str:
    """The UTF-8 text of ``path``; a missing, unreadable, non-UTF-8 or empty file is refused by name."""
    path = check_path(path, what)
    if not path.is_file():
        raise SpearError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpearError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise SpearError(f"{what} {str(path)!r} cannot be read ({e.strerror or e})") from None
    if not text.strip():
        raise SpearError(f"{what} {str(path)!r} is empty")
    return text


def check_model_dir(path, name: str = "model") -> Path:
    """A Hugging Face model directory whose ``config.json`` is readable JSON with a ``model_type``."""
    path = check_path(path, name)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SpearError(f"{name} path {str(path)!r} is not a Hugging Face model directory (no config.json)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpearError(f"{name} config {str(cfg)!r} is not valid UTF-8 JSON ({e})") from None
    except OSError as e:
        raise SpearError(f"{name} config {str(cfg)!r} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise SpearError(f"{name} config {str(cfg)!r} has no 'model_type': corrupt or not a transformers config")
    return path


def load_causal_lm(path, dtype=torch.bfloat16, device=None):
    """``AutoModelForCausalLM.from_pretrained`` with its failures on a bad directory as ``SpearError``."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as e:
        raise SpearError(f"model {str(path)!r} cannot be loaded: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}") from None
    model = model.eval()
    return model.to(device) if device is not None else model


def load_tokenizer(path):
    from transformers import AutoTokenizer

    path = check_model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise SpearError(f"tokenizer of {str(path)!r} cannot be loaded: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}") from None


def check_seq_len(model, seq_len: int, name: str = "seq_len") -> None:
    """``seq_len`` fits the model's positions (beyond them a RoPE model runs, but its outputs are not the model's)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise SpearError(f"{name}={seq_len} exceeds the model's max_position_embeddings={limit}")


def check_out_dir(path, name: str = "out_dir") -> Path:
    """``path`` is (or can be made) a writable directory: checked by writing a probe file, so a bad
    output location fails before minutes of work rather than after."""
    path = check_path(path, name)
    if path.exists() and not path.is_dir():
        raise SpearError(f"{name} {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".spear-write-check-"):
            pass
    except OSError as e:
        raise SpearError(f"{name} {str(path)!r} is not writable ({e.strerror or e})") from None
    return path
