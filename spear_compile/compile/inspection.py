"""``spear_compile.inspect``: what the compiler will do with each quantized linear.

Compiles the model once with the ``spear`` backend (caches off, so the pass really runs) on an
example input, then reports one row per ``spear::qlinear`` the pass saw: module, matched or
not and why, shapes, dtype, EC rank/gate, the sibling group it was merged into (one launch for
e.g. q|k|v, ``GroupSiblingLinearsPass``), and the kernel ``lowering.dispatch.choose`` (grouped:
``choose_grouped``) would pick for ``m`` rows (``"reference"`` where no kernel applies: CPU, fp32,
or no dispatch module). For a tensor-parallel model, also which row-parallel W4 + EC linears the
peer-reduction pass rewrote and which keep the u all-reduce fallback, and why.
"""
from __future__ import annotations

import inspect as _python_inspect
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

from ..errors import SpearError
from .backend import SpearBackend
from .records import GroupRecord, MatchRecord, PeerReduceRecord


@dataclass
class InspectionRow:
    module: str
    node: str
    matched: bool
    kind: str
    reason: str
    n: int
    k: int
    group_size: int
    dtype: str
    rank: int
    gate: str
    bias: bool
    kernel: str
    group: str = ""  # "g<i>" when merged with siblings into one grouped launch


@dataclass
class InspectionReport:
    rows: List[InspectionRow] = field(default_factory=list)
    m: int = 1
    device: str = "cpu"
    groups: List[GroupRecord] = field(default_factory=list)
    peer_reduce: List[PeerReduceRecord] = field(default_factory=list)  # row-parallel W4 + EC linears (TP)

    @property
    def matched(self) -> int:
        return sum(r.matched for r in self.rows)

    @property
    def unmatched(self) -> List[InspectionRow]:
        return [r for r in self.rows if not r.matched]

    def table(self) -> str:
        head = ("module", "fused", "kind", "N", "K", "group", "dtype", "EC", "bias", "launch",
                f"kernel (m={self.m}, {self.device})")
        body = [(r.module, "yes" if r.matched else "NO", r.kind, str(r.n), str(r.k), str(r.group_size), r.dtype,
                 f"r={r.rank} {r.gate}" if r.rank else "-", "yes" if r.bias else "-", r.group or "own",
                 r.kernel if r.matched else f"reference ({r.reason})") for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
        out.append(f"{self.matched}/{len(self.rows)} quantized linears fused")
        launches = sum(1 for r in self.rows if r.matched and not r.group) + len(self.groups)
        out.append(f"{len(self.groups)} sibling groups ({sum(len(g.members) for g in self.groups)} linears), "
                   f"{launches} launches for {self.matched} fused linears")
        for g in self.groups:
            ec = f", EC r={g.ec_rank} each" if g.ec_rank else ""
            out.append(f"  g{g.index}: {' | '.join(g.modules)}  (N {'+'.join(map(str, g.ns))}, K {g.k}{ec})")
        if self.peer_reduce:
            out.append(f"{sum(r.rewritten for r in self.peer_reduce)}/{len(self.peer_reduce)} row-parallel EC linears "
                       f"peer-reduced (u reduction):")
            for r in self.peer_reduce:
                how = "peer-reduce epilogue" if r.rewritten else f"all-reduce fallback ({r.reason})"
                out.append(f"  {r.module or r.node}: {how}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def kernel_for(m: int, rec: MatchRecord, device: str, group: Optional[GroupRecord] = None) -> str:
    """Name of the kernel ``dispatch.choose`` (``choose_grouped`` for a grouped member) picks, or ``"reference"``."""
    if not rec.matched:
        return "reference"
    if rec.kind == "peer-reduce":
        return "spear::peer_reduce_row_ec (Triton: W4 GEMV + u dual-written to every peer, gated, + B u)"
    if rec.decomposed:
        ec = {"kcat": ", EC as K-concat [x | v][W | B]ᵀ", "c_in": ", EC as addmm C input"}.get(rec.decomposed_ec, "")
        if rec.decomposed_pad_x:
            ec += ", [x | 0] from x's producer"
        if rec.decomposed_merged:
            ec += f"; one GEMM with {', '.join(rec.decomposed_merged)}"
        return f"decomposed: dequantize ({rec.decomposed_with}) + mm in the graph (cuBLAS{ec})"
    if device != "cuda" or rec.dtype not in ("bfloat16", "float16"):
        return f"reference ({device}, {rec.dtype})"
    from ..lowering.dispatch import choose
    from ..lowering.grouped import choose_grouped, choose_grouped_ec
    try:
        if group is not None and group.ec_rank:
            return choose_grouped_ec(m, group.k, group.ns, group.group_size, getattr(torch, group.dtype), group.bias,
                                     group.ec_rank, rec.gated, merged=None)
        if group is not None:  # (packed siblings or not: unknown here; the adjacent key's pick when there is one)
            return choose_grouped(m, group.k, group.ns, group.group_size, getattr(torch, group.dtype), group.bias,
                                  adjacent=None)
        return choose(m, rec.k, rec.n, rec.group_size, getattr(torch, rec.dtype), rec.rank, rec.gated)
    except Exception as e:  # noqa: BLE001  (inspection reports, it does not fail)
        return f"reference (dispatch.choose failed: {e})"


def _example_input(model: nn.Module, m: int, device):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        return torch.zeros(1, m, dtype=torch.long, device=device)
    lin = next((mod for mod in model.modules() if isinstance(mod, nn.Linear)), None)
    if lin is None:
        raise SpearError(f"inspect: {type(model).__name__} has no nn.Linear; pass example_input=")
    return torch.zeros(m, lin.in_features, dtype=lin.weight.dtype, device=device)


def _isolated() -> dict:
    """Recompiles of this compile counted apart from the model's other compiles (torch >= 2.12), so repeated
    inspections do not exhaust the shared recompile limit."""
    return ({"isolate_recompiles": True} if "isolate_recompiles" in _python_inspect.signature(torch.compile).parameters
            else {})


@torch.no_grad()
def inspect(model: nn.Module, example_input: Optional[torch.Tensor] = None, m: int = 1) -> InspectionReport:
    """Compile ``model`` (not in place) on ``example_input`` (default: ``m`` tokens of batch 1 for an
    HF causal LM, else ``[m, in_features]``) and report the pass's decisions per quantized linear.
    Compiles with a backend of its own (its records only; Dynamo's caches of other compiles are left alone)."""
    if not isinstance(model, nn.Module):
        raise SpearError(f"inspect: expected an nn.Module, got {type(model).__name__}")
    from ..checks import check_int
    check_int(m, "inspect: m")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = _example_input(model, m, device) if example_input is None else example_input
    if example_input is not None:
        m = int(x.shape[:-1].numel()) if x.is_floating_point() else int(x.numel())
    backend = SpearBackend()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="spear_compile: .* left as the reference")
        warnings.filterwarnings("ignore", message="spear_compile: .* keeps the u all-reduce fallback")  # in the report
        torch.compile(model, backend=backend, **_isolated())(x)
    report = InspectionReport(m=m, device=device.type, groups=list(backend.records.groups),
                              peer_reduce=list(backend.records.peer_reduce))
    by_index = {g.index: g for g in report.groups}
    for rec in backend.records.matches:
        group = by_index.get(rec.group)
        report.rows.append(InspectionRow(
            module=rec.module or rec.node, node=rec.node, matched=rec.matched, kind=rec.kind, reason=rec.reason,
            n=rec.n, k=rec.k, group_size=rec.group_size, dtype=rec.dtype, rank=rec.rank,
            gate=("sigmoid" if rec.gated else "none") if rec.rank else "-", bias=rec.bias,
            kernel=kernel_for(m, rec, device.type, group), group=f"g{group.index}" if group else ""))
    return report


# ---- CLI: spear-compile inspect ----------------------------------------------------------------
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("inspect",
                              help="show which quantized linears the compiler fuses and which kernel each gets")
    from ..evaluate import DEFAULT_MODEL
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="Hugging Face model directory (default: bundled spear-ref-16m)")
    p.add_argument("--quant", default="w4-pc-rtn", help="quantization spec, e.g. w4-pc-rtn, w4-g128-rtn")
    p.add_argument("--ec", default=None, help="EC directory (save_ecs output) to attach")
    from ..cli import positive_int
    p.add_argument("--m", type=positive_int, default=1, help="rows (tokens) per call: 1 = decode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.set_defaults(func=_cli_inspect)


def _cli_inspect(args) -> int:
    from ..checks import check_device, check_model_dir, load_causal_lm
    from ..quant.api import as_config, quantize

    check_model_dir(args.model)  # every option checked before the model is loaded and compiled
    device = check_device(args.device, "--device")
    config = as_config(args.quant, "--quant")
    if config is None:
        raise SpearError("inspect: --quant none has no quantized linear to inspect")
    if args.ec:
        from ..ec.io import check_ec_dir
        check_ec_dir(args.ec, config)
    model = load_causal_lm(args.model, getattr(torch, args.dtype), device)
    quantize(model, config, progress=False)
    if args.ec:
        from ..ec.io import load_ecs
        load_ecs(model, args.ec, config)
    print(inspect(model, m=args.m).table())
    return 0
