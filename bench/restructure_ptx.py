"""Issue 15's "kernels only moved, compiled code identical", without a GPU: the PTX of every Triton kernel
specialization two revisions compile, compared.

1. The newer revision's kernel and lowering tests run under ``TRITON_INTERPRET=1`` with every kernel launch recorded
   (kernel name; each argument's kind: constexpr value, pointer dtype, integer value, None; num_warps / num_stages),
   one record per distinct specialization.
2. Each revision's own kernels (found by name in its ``spear_compile`` package) compile every record ahead of time
   for sm_90 (Triton's bundled ``ptxas``; the specialization rules of ``kernels/aot.py``: pointers and multiples of
   16 get the divisibility hint, an integer 1 becomes a constant).
3. Per kernel: how many records give the same PTX (``.loc`` / ``.file`` / comments / labels / debug sections
   removed, hashed), differ, or do not fit the other revision's signature.

    python -m bench.restructure_ptx --old e44cd3e --new 4b1ab58 --md bench/results/restructure_ptx.md

The revisions are checked out as git worktrees under a temporary directory; both compile with this environment's
Triton (the comparison is of the source, so one compiler for both). Timing needs a GPU (``GPU_RUNS.md`` #8).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

TESTS = ("tests/kernels", "tests/lowering")


# ---------------------------------------------------------------------------------------------- 1. record
def record(out_path, pytest_args):
    """In the newer revision's checkout (cwd): run pytest with every interpreted kernel launch recorded."""
    import pytest
    import torch
    from triton.runtime import interpreter

    dtypes = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
              torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.int16: "i16", torch.bool: "i1"}
    seen, original = set(), interpreter.InterpretedFunction.run

    def describe(fn, args, kwargs):
        params = list(inspect.signature(fn).parameters.values())
        bound = dict(zip([p.name for p in params], args))
        launch = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
        rec = {}
        for p in params:
            if p.name not in bound:
                continue
            v = bound[p.name]
            if "constexpr" in str(p.annotation):
                rec[p.name] = ["const", v if isinstance(v, (int, float, bool, str, type(None))) else str(v)]
            elif isinstance(v, torch.Tensor):
                rec[p.name] = ["ptr", dtypes.get(v.dtype, str(v.dtype))]
            elif v is None:
                rec[p.name] = ["none", None]
            elif isinstance(v, (bool, int)):
                rec[p.name] = ["int", int(v)]
            elif isinstance(v, float):
                rec[p.name] = ["float", v]
            else:
                rec[p.name] = ["other", type(v).__name__]
        return {"name": fn.__name__, "args": rec, "launch": launch}

    def run(self, *args, grid, warmup, **kwargs):
        rec = describe(self.fn, args, kwargs)
        key = json.dumps([rec["name"], rec["launch"], sorted(
            (n, k, [v == 1, v % 16 == 0] if k == "int" else v) for n, (k, v) in rec["args"].items())])
        if key not in seen:
            seen.add(key)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    return pytest.main(list(pytest_args))


# ---------------------------------------------------------------------------------------------- 2. compile
def normalized_ptx_hash(ptx):
    keep, in_debug = [], False
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith(".section") and "debug" in s:
            in_debug = True
        if in_debug:
            in_debug = s != "}"
            continue
        if not s or s.startswith((".loc", ".file", "//", "$L__")):
            continue
        keep.append(re.sub(r"\s*//.*$", "", line))
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()[:16]


def compile_records(recs_path, out_path):
    """In a revision's checkout (cwd, on sys.path): compile every record with this revision's kernel of its name."""
    import spear_compile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {}
    for m in pkgutil.walk_packages(spear_compile.__path__, "spear_compile."):
        try:
            mod = importlib.import_module(m.name)
        except Exception:  # noqa: BLE001  (a module this environment cannot import holds no kernel we compare)
            continue
        for v in vars(mod).values():
            if isinstance(v, triton.runtime.jit.JITFunction):
                kernels.setdefault(v.fn.__name__, v)

    def one(kernel, rec):
        names, args = kernel.arg_names, rec["args"]
        if set(args) - set(names):
            return "signature"
        no_spec = {names[i] if isinstance(i, int) else i for i in (kernel.do_not_specialize or ())}
        sig, attrs, consts = {}, {}, {}
        for i, n in enumerate(names):
            if n not in args:
                if not kernel.params[i].is_constexpr:
                    return "signature"
                sig[n], consts[n] = "constexpr", kernel.params[i].default
                continue
            kind, v = args[n]
            if kind in ("const", "none"):
                sig[n], consts[n] = "constexpr", v
            elif kind == "ptr":
                sig[n], attrs[(i,)] = "*" + v, [["tt.divisibility", 16]]
            elif kind == "int" and n not in no_spec and v == 1:
                sig[n], consts[n] = "constexpr", 1
            elif kind == "int":
                sig[n] = "i32"
                if n not in no_spec and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif kind == "float":
                sig[n] = "fp32"
            else:
                return f"error: argument {n} of kind {kind}"
        src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()},
                        attrs=attrs)
        launch = rec["launch"]
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": launch.get("num_warps", 4),
                                           "num_stages": launch.get("num_stages", 3)})
        return normalized_ptx_hash(compiled.asm["ptx"])

    out = []
    for line in open(recs_path):
        rec = json.loads(line)
        kernel = kernels.get(rec["name"])
        try:
            out.append("missing" if kernel is None else one(kernel, rec))
        except Exception as e:  # noqa: BLE001
            out.append(f"error: {type(e).__name__}: {str(e)[:160]}")
    with open(out_path, "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------------- 3. compare
def sub(mode, cwd, *args, interpret=False):
    """This script in ``mode`` in a revision's checkout (a started process)."""
    env = dict(os.environ, PYTHONPATH=cwd, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, *args], cwd=cwd, env=env)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="e44cd3e")
    ap.add_argument("--new", default="4b1ab58")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, rev in (("old", args.old), ("new", args.new)):
            trees[name] = os.path.join(tmp, name)
            subprocess.run(["git", "-C", repo, "worktree", "add", "-f", "--detach", "-q", trees[name], rev], check=True)
        try:
            recs = os.path.join(tmp, "records.jsonl")
            rc = sub("_record", trees["new"], recs, "-q", "-p", "no:cacheprovider", *TESTS, interpret=True).wait()
            paths = {name: os.path.join(tmp, f"ptx_{name}.json") for name in trees}
            for proc in [sub("_compile", trees[name], recs, paths[name]) for name in trees]:   # both at once
                proc.wait()
            hashes = {name: json.load(open(path)) for name, path in paths.items()}
            records = [json.loads(line) for line in open(recs)]
        finally:
            for path in trees.values():
                subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", path], check=False)
    rows = collections.OrderedDict()
    for rec, old, new in zip(records, hashes["old"], hashes["new"]):
        if old == "signature":
            verdict = "signature differs"
        elif "error" in old or "error" in new or "missing" in (old, new):
            verdict = "not compiled"
        else:
            verdict = "identical" if old == new else "different"
        rows.setdefault(rec["name"], collections.Counter())[verdict] += 1
    import triton
    lines = [f"# Restructure: compiled code of every kernel specialization, {args.old} vs {args.new}", "",
             f"{time.strftime('%Y-%m-%d')}, no GPU: PTX for sm_90 from Triton {triton.__version__}'s bundled ptxas. "
             f"Command: `python -m bench.restructure_ptx --old {args.old} --new {args.new}` ({time.time() - t0:.0f} s; "
             f"the recording tests exited with {rc}). Records: the distinct launches of {args.new}'s "
             f"`{' '.join(TESTS)}` under the interpreter; each compiled by both revisions' kernel of that name.", "",
             "| kernel | specializations | identical | different | signature differs | not compiled |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, c in rows.items():
        lines.append(f"| `{name}` | {sum(c.values())} | {c['identical']} | {c['different']} | "
                     f"{c['signature differs']} | {c['not compiled']} |")
    total = collections.Counter()
    for c in rows.values():
        total.update(c)
    lines += ["", f"All: {sum(total.values())} specializations, {total['identical']} identical, {total['different']} "
                  f"different, {total['signature differs']} with another signature, {total['not compiled']} not compiled; "
                  f"{len(set(hashes['new']))} distinct PTX among them.", ""]
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_record", "_compile"):
        sys.path[0] = os.getcwd()   # the revision's checkout, not bench/ (whose kernels.py would shadow a package)
        if sys.argv[1] == "_record":
            sys.exit(record(sys.argv[2], sys.argv[3:]))
        compile_records(sys.argv[2], sys.argv[3])
        sys.exit(0)
    main()
