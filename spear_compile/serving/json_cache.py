"""The serving engine's JSON files beside the tuning cache (``tune_cache.cache_dir()``): the step-cost profile
(``scheduler/profile.py``) and the mixed-step graph shapes (``shape_cache.py``). A file names its schema and the
fields it is valid for; one that is unreadable, corrupt or for other fields is refused whole, with a warning, and
rewritten by its owner. Writes are atomic (a temporary file, then ``os.replace``)."""
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
