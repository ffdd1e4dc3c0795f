"""On-disk cache of the dispatch tuner's picks, so a new process does not re-time every key.

Where: the directory ``SPEAR_TUNE_CACHE`` names (``0`` or an empty value: off), else
``$XDG_CACHE_HOME/spear_compile`` or ``~/.cache/spear_compile``. One JSON file per environment: GPU name, SM
count, torch version, triton version, the candidate switches (``options.gluon_kernel`` / ``gluon_swap``) and a
hash of the lowering's and kernels' sources (``spear_compile/lowering/*.py``, ``spear_compile/kernels/*.py``);
the file name carries a short hash of those fields and the file's header repeats them, so a new GPU, a new
torch/triton or an edited kernel, candidate list or timing code starts a new file (the old ones are left as they
are). Each entry maps a tuner key (``tuner.LinearKey`` / ``GroupKey``, a tuple stored as a JSON list) to the
winner's config name and the timed results as ``Tuner.timings`` holds them (``(name, ms)``, or
``(name, "failed: ...")``).

A ``TuneCache`` (the tuner holds one) reads a file once (per path); ``lookup`` rebuilds the config by name from the candidates the tuner
would time now (a name not among them is a miss). ``store`` reads the file again, merges the new entry and
replaces the file by a temporary one in the same directory (``os.replace``): concurrent processes never leave a
torn file (one of two simultaneous writers' entries may be lost: it is re-tuned next time). A file that does not
parse, has the wrong schema or another environment's header is ignored wholesale with one warning (re-tuned,
overwritten by the next ``store``). JSON only: nothing is unpickled or evaluated.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import tempfile
import warnings

import torch
import triton

from .. import options

SCHEMA = 1
_SOURCE_DIRS = ("lowering", "kernels")  # their *.py are hashed into the environment


def cache_dir():
    """The cache directory, or None when ``SPEAR_TUNE_CACHE`` is ``0`` or empty."""
    return options.current().tune_cache_dir


def _device_fields(device):
    """GPU name and SM count of ``device`` (tests replace this to run on CPU)."""
    if device.type != "cuda":
        return {"gpu": device.type, "sms": 0}
    return {"gpu": torch.cuda.get_device_name(device),
            "sms": torch.cuda.get_device_properties(device).multi_processor_count}


@functools.lru_cache(maxsize=None)
def _code_hash():
    """Hash of every ``spear_compile/{lowering,kernels}/*.py`` (names and bytes): kernels, candidate lists, timing
    code."""
    h = hashlib.sha256()
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in _SOURCE_DIRS:
        for path in sorted(glob.glob(os.path.join(package, sub, "*.py"))):
            with open(path, "rb") as f:
                h.update(f"{sub}/{os.path.basename(path)}".encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]


def environment(device):
    """The fields a cache file is valid for (its header repeats them); the switches that add tuner candidates
    included, so turning one on or off is tuned again rather than served the other setting's picks."""
    opts = options.current()
    return dict(_device_fields(device), torch=str(torch.__version__), triton=str(triton.__version__),
                code=_code_hash(), candidates={"gluon": opts.gluon_kernel, "gluon_swap": opts.gluon_swap})


def _path_for(fields):
    directory = cache_dir()
    if directory is None:
        return None
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(directory, f"tune-{digest}.json")


def _as_key(obj):
    """A stored key (JSON list) as the tuple the tuner makes; nested lists (grouped member widths) as tuples."""
    if isinstance(obj, list):
        return tuple(_as_key(v) for v in obj)
    if isinstance(obj, (str, int)):  # bool is an int
        return obj
    raise ValueError(f"key element {obj!r} is not a string, integer, boolean or list")


def _as_results(obj):
    if not isinstance(obj, list):
        raise ValueError("results is not a list")
    out = []
    for item in obj:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (float, str))):
            raise ValueError(f"result {item!r} is not [config name, ms or failure string]")
        out.append((item[0], item[1]))
    return out


def _parse(data, fields):
    """The entries of a loaded file; ``ValueError`` (the reason) if any part is not as ``store`` writes it."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"not a schema-{SCHEMA} tuning cache")
    if data.get("fields") != fields:
        raise ValueError(f"header {data.get('fields')!r} does not match this environment {fields!r}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError("entries is not a list")
    out = {}
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("key"), list) and isinstance(e.get("config"), str)):
            raise ValueError(f"entry {e!r} has no key list and config name")
        out[_as_key(e["key"])] = (e["config"], _as_results(e.get("results")))
    return out


class TuneCache:
    """This process's view of the cache files: each read once (``loaded``), each damaged one warned about once."""

    def __init__(self):
        self.loaded = {}  # path -> {key tuple: (config name, [(name, ms or failure string), ...])}
        self._warned = set()

    def _warn_once(self, path, reason):
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(f"spear_compile tuning cache {path}: {reason}; ignoring it (keys are re-tuned and the file "
                          f"is rewritten)", stacklevel=3)

    def _read(self, path, fields):
        """The file's entries; {} when it is missing, or (with one warning) unreadable, corrupt or mismatched."""
        try:
            with open(path, encoding="utf-8") as f:
                return _parse(json.load(f), fields)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._warn_once(path, f"{type(e).__name__}: {e}")
            return {}

    def _entries(self, device):
        """(path, entries) of ``device``'s file, read once per process; (None, {}) when the cache is off."""
        fields = environment(device)
        path = _path_for(fields)
        if path is None:
            return None, {}
        if path not in self.loaded:
            self.loaded[path] = self._read(path, fields)
        return path, self.loaded[path]

    def lookup(self, key, cands, device):
        """``(config, results)`` for ``key`` from the cache, the config the one of ``cands`` with the stored name;
        None on a miss (no entry, cache off, or a name not among ``cands``: warned)."""
        path, entries = self._entries(device)
        if key not in entries:
            return None
        name, results = entries[key]
        cfg = next((c for c in cands if c.name == name), None)
        if cfg is None:
            warnings.warn(f"spear_compile tuning cache {path}: the cached config {name} of {key} is not among the "
                          f"tuner's candidates; re-tuning", stacklevel=2)
            return None
        return cfg, list(results)

    def store(self, key, name, results, device):
        """Record ``key``'s winner ``name`` and its timed ``results``: re-read the file, merge, replace it atomically.
        A write that fails (read-only directory, a key JSON cannot hold) warns and leaves the file as it was."""
        fields = environment(device)
        path = _path_for(fields)
        if path is None:
            return
        entries = self._read(path, fields)
        entries.update(self.loaded.get(path, {}))  # this process's entries too (re-adds any a concurrent writer dropped)
        entries[key] = (name, [(n, ms) for n, ms in results])
        doc = {"schema": SCHEMA, "fields": fields,
               "entries": [{"key": list(k), "config": c, "results": [list(r) for r in res]}
                           for k, (c, res) in entries.items()]}
        tmp = None
        try:
            text = json.dumps(doc, indent=1)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tune-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
            tmp = None
            self.loaded[path] = entries
        except (OSError, TypeError, ValueError) as e:
            warnings.warn(f"spear_compile tuning cache {path}: could not save ({type(e).__name__}: {e})", stacklevel=2)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def forget(self):
        """Drop this process's loaded files and warnings (the files stay): the next lookup reads them again."""
        self.loaded.clear()
        self._warned.clear()
