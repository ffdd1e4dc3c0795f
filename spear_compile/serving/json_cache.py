"""The serving engine's JSON files beside the tuning cache (``tune_cache.cache_dir()``): the step-cost profile
(``scheduler/profile.py``) and the mixed-step graph shapes (``shape_cache.py``), and the model and engine fields
both are keyed on (``model_fingerprint``, ``engine_layout``). A file names its schema and the fields it is valid
for; one that is unreadable, corrupt or for other fields is refused whole, with a warning, and rewritten by its
owner. Writes are atomic (a temporary file, then ``os.replace``)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Callable, Optional


def path_for(prefix: str, fields: dict) -> Optional[str]:
    """``<cache dir>/<prefix>-<digest of fields>.json``, or None when the on-disk cache is off."""
    from ..lowering import tune_cache
    directory = tune_cache.cache_dir()
    if directory is None:
        return None
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(directory, f"{prefix}-{digest}.json")


def load(path: Optional[str], schema: int, fields: dict, key: str, parse: Callable, what: str, refused: str):
    """``parse(data[key])`` of the file at ``path``, or None when it is missing, or (a warning naming ``what`` and
    what happens instead, ``refused``) unreadable, of another schema or fields, or ``parse`` raises ``ValueError``
    / ``TypeError`` / ``KeyError``."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("schema") != schema:
            raise ValueError(f"not a schema-{schema} {what}")
        if json.dumps(data.get("fields"), sort_keys=True, default=str) != json.dumps(fields, sort_keys=True,
                                                                                     default=str):
            raise ValueError("header does not match this engine")
        return parse(data.get(key))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"spear_compile {what} {path}: {type(e).__name__}: {e}; ignoring it ({refused})", stacklevel=3)
        return None


def save(path: Optional[str], schema: int, fields: dict, key: str, rows: list, what: str) -> None:
    """Write ``{"schema", "fields", key: rows}`` atomically; a failed write warns and changes nothing."""
    if path is None:
        return
    tmp = None
    try:
        text = json.dumps({"schema": schema, "fields": fields, key: rows}, default=str)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except (OSError, TypeError, ValueError) as e:
        warnings.warn(f"spear_compile {what} {path}: could not save ({type(e).__name__}: {e})", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# ---- the fields both files are keyed on (beside their own) ---------------------------------------------------
def model_fingerprint(model) -> dict:
    """Shape and weight formats of ``model``: config sizes, and each distinct linear weight format with its count."""
    model = getattr(model, "_orig_mod", model)
    cfg = getattr(model, "config", None)
    sizes = {k: getattr(cfg, k, None) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                  "head_dim")} if cfg is not None else {}
    formats: dict = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or not hasattr(w, "shape") or w.dim() != 2:
            continue
        fmt = f"{type(w).__name__}:{getattr(w, 'dtype', '')}:{'unwrapped' if hasattr(m, '_spear_qdata') else ''}"
        for attr in ("bits", "group_size", "symmetric"):
            if hasattr(w, attr):
                fmt += f":{attr}={getattr(w, attr)}"
        formats[fmt] = formats.get(fmt, 0) + 1
    return {"sizes": sizes, "weights": dict(sorted(formats.items()))}


def engine_layout(runner) -> dict:
    """The engine's buckets and graph settings: what its cache files' samples and shapes depend on."""
    cfg = runner.config
    return {"decode_buckets": list(runner.decode_buckets), "token_buckets": list(runner.token_buckets),
            "table_buckets": list(runner.table_buckets), "block_size": runner.block_size,
            "cuda_graphs": bool(runner.use_cuda_graphs), "compile": bool(cfg.compile),
            "max_model_len": runner.max_model_len}
