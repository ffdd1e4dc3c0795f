"""Post-grad pass: ``spear::qlinear`` (+ the EC chain of ``CompensatedLinear``) -> ``spear::fused_linear``.

Patterns are hand-written ``torch._inductor.pattern_matcher`` trees over the post-grad graph,
where ``F.linear`` has become ``mm``/``addmm`` of a ``permute``d weight (plus ``view``/``reshape``s
around it for 3-D input). The backend runs the pass before Inductor's own post-grad patterns; the
variants those would produce (final ``add`` folded into ``addmm``) are matched too.
One tree per variant: 2-D/3-D input x gated (gate bias or not)/static EC x root form.
Anything that does not match stays as it was (correct, reference op) and is logged in the compile's
``CompileRecords``; a ``spear::qlinear`` left in the graph triggers a warning.
"""
from __future__ import annotations

import itertools
import re
import warnings

import torch
from torch._inductor.pattern_matcher import (
    MULTIPLE, CallFunction, Ignored, KeywordArg, Match, PatternMatcherPass, register_graph_pattern,
)

from ...quant import qlinear as ops  # noqa: F401  (registers spear::qlinear)
from ...lowering import fused_linear  # noqa: F401  (registers spear::fused_linear)
from ..records import MatchRecord, PassContext
from .base import SpearGraphPass

aten = torch.ops.aten
prims = torch.ops.prims
QLINEAR = torch.ops.spear.qlinear.default
FUSED = torch.ops.spear.fused_linear.default
RESHAPES = [aten.reshape.default, aten.view.default, aten._unsafe_view.default]
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---- pattern building blocks -------------------------------------------------------------
def _reshape(p, users=1):
    return CallFunction(RESHAPES, p, Ignored(), _users=users)


def _wt(name):
    return CallFunction(aten.permute.default, KeywordArg(name), [1, 0])


def _qlinear():
    return CallFunction(QLINEAR, KeywordArg("x"), KeywordArg("qdata"), KeywordArg("scale"),
                        KeywordArg("zero"), KeywordArg("bias"), KeywordArg("group_size"))


def _ec_branches(nd: int, gate: str):
    """Alternative patterns for ``v`` (the input of the ``B`` linear, already flattened to 2-D)."""
    x2 = KeywordArg("x") if nd == 2 else _reshape(KeywordArg("x"), users=MULTIPLE)
    ua = CallFunction(aten.mm.default, x2, _wt("ec_A"), _users=1 if gate == "none" or nd == 3 else 2)
    if gate == "none":
        # 3-D: Inductor usually drops the reshape-to-3-D / reshape-to-2-D pair between the mms
        return [ua] if nd == 2 else [ua, _reshape(_reshape(ua))]
    return gated_products(ua if nd == 2 else _reshape(ua, users=2), nd, gate)


def gated_products(u, nd: int, gate: str):
    """Alternative patterns for ``g(u) ⊙ u`` flattened to 2-D, ``g(u) = 2 sigmoid(u W_gᵀ [+ b_g])`` (``gate``:
    ``"sigmoid"`` with a gate bias, else without); ``u`` in x's rank (also the peer-reduction pass's)."""
    u2 = u if nd == 2 else _reshape(u)
    if gate == "sigmoid":
        gates = [CallFunction(aten.addmm.default, KeywordArg("gate_b"), u2, _wt("gate_w"))]
        gates += [_cpu_m1_addmm(u2, cast) for cast in (False, True)]
    else:  # sigmoid gate without a gate bias
        gates = [CallFunction(aten.mm.default, u2, _wt("gate_w"))]
    out = []
    for g in gates:
        g = g if nd == 2 else _reshape(g)
        s = CallFunction(aten.mul.Tensor, CallFunction(aten.sigmoid.default, g), 2.0)
        v = CallFunction(aten.mul.Tensor, u, s)
        out.append(v if nd == 2 else _reshape(v))
    return out


def _cpu_m1_addmm(u2, cast: bool):
    """Inductor's CPU decomposition of an M=1 ``addmm``: ``sum(uᵀ * Wᵀ, 0) * 1 + b * 1``, with
    casts to fp32 and back for low-precision dtypes."""
    cvt = (lambda p: CallFunction(prims.convert_element_type.default, p, Ignored())) if cast else (lambda p: p)
    prod = CallFunction(aten.mul.Tensor, CallFunction(aten.permute.default, cvt(u2), [1, 0]), cvt(_wt("gate_w")))
    summed = CallFunction(aten.sum.dim_IntList, prod, [0], True)
    g = CallFunction(aten.add.Tensor, CallFunction(aten.mul.Tensor, summed, 1),
                     CallFunction(aten.mul.Tensor, cvt(KeywordArg("gate_b")), 1))
    return cvt(g)


def ec_patterns():
    """``(pattern, gate)`` for every variant of qlinear + EC."""
    out = []
    for nd, gate in itertools.product((2, 3), ("sigmoid", "sigmoid-nobias", "none")):
        for v in _ec_branches(nd, gate):
            out += [(root, gate) for root in _roots(nd, v)]
    return out


def _roots(nd: int, v):
    """``qlinear(x) + v @ ec_Bᵀ`` as it appears post-grad (Inductor folds 2-D adds into addmm)."""
    ec = CallFunction(aten.mm.default, v, _wt("ec_B"))
    if nd == 2:
        return [CallFunction(aten.addmm.default, _qlinear(), v, _wt("ec_B")),
                CallFunction(aten.add.Tensor, _qlinear(), ec),
                CallFunction(aten.add.Tensor, ec, _qlinear())]
    ec3 = _reshape(ec)
    return [CallFunction(aten.add.Tensor, _qlinear(), ec3), CallFunction(aten.add.Tensor, ec3, _qlinear())]


# ---- checks --------------------------------------------------------------------------------
def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def check_operands(kw: dict) -> str:
    """'' when the operands can be lowered to ``spear::fused_linear``, else the reason."""
    x, q, s, z = (_val(kw[k]) for k in ("x", "qdata", "scale", "zero"))
    if any(t is None for t in (x, q, s, z)):
        return "no shape metadata"
    k, n = x.shape[-1], q.shape[0]
    if x.dtype not in FLOAT_DTYPES:
        return f"activation dtype {x.dtype} not in bf16/fp16/fp32"
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] * 2 != k:
        return f"qdata {tuple(q.shape)} {q.dtype} is not a 4-bit container for K={k}"
    gs = kw["group_size"]
    if not isinstance(gs, int) or gs <= 0 or k % gs or tuple(s.shape) != (n, k // gs) or tuple(z.shape) != (n, k // gs):
        return f"scale/zero {tuple(s.shape)}/{tuple(z.shape)} inconsistent with N={n}, K={k}, group_size={gs}"
    if s.dtype != x.dtype or z.dtype != x.dtype:
        return f"scale/zero dtype {s.dtype}/{z.dtype} != activation dtype {x.dtype}"
    b = _val(kw.get("bias"))
    if b is not None and (tuple(b.shape) != (n,) or b.dtype != x.dtype):
        return f"bias {tuple(b.shape)} {b.dtype} inconsistent with N={n}, {x.dtype}"
    if "ec_A" not in kw:
        return ""
    a, bb = _val(kw["ec_A"]), _val(kw["ec_B"])
    r = a.shape[0] if a is not None and a.dim() == 2 else -1
    want = {"ec_A": (r, k), "ec_B": (n, r), "gate_w": (r, r), "gate_b": (r,)}
    for name, shape in want.items():
        t = _val(kw.get(name))
        if name in kw and (t is None or tuple(t.shape) != shape or t.dtype != x.dtype):
            got = "?" if t is None else f"{tuple(t.shape)} {t.dtype}"
            return f"EC {name} is {got}, expected {shape} {x.dtype}"
    if bb is None:
        return "EC without B"
    return ""


def _ec_like(q: torch.fx.Node, depth: int = 16) -> bool:
    """True when the qlinear feeds an add/addmm whose other operand is a low-rank side branch
    of the same input ``x`` (reached within a few nodes, through a matmul narrower than
    min(N, K), not through another quantized linear): an EC we did not recognise."""
    x, xv, qv = q.args[0], _val(q.args[0]), _val(q.args[1])
    if xv is None or qv is None:
        return False
    width = min(xv.shape[-1], qv.shape[0])
    spear_ops = (QLINEAR, FUSED)
    for user in q.users:
        if user.target not in (aten.add.Tensor, aten.addmm.default):
            continue
        frontier, seen, narrow = [a for a in user.all_input_nodes if a is not q], set(), False
        for _ in range(depth):
            nxt = []
            for node in frontier:
                if node is x:
                    if narrow:
                        return True
                    continue
                if node in seen or node.op != "call_function" or node.target in spear_ops:
                    continue
                seen.add(node)
                v = _val(node)
                if node.target in (aten.mm.default, aten.addmm.default) and v is not None and v.shape[-1] < width:
                    narrow = True
                nxt += node.all_input_nodes
            frontier = nxt
    return False


_GETATTR = re.compile(r"getattr\((.*), ['\"]([^'\"]*)['\"]\)")
_ROOT = re.compile(r"^(?:[LG](?:\[[^\]]*\])+|L__self__|self)")
_SUBSCRIPT = re.compile(r"\._modules\[['\"]([^'\"]*)['\"]\]|\[['\"]?([^'\"\]]*)['\"]?\]")


def module_path(source: str) -> str:
    """The ``named_modules()`` name in a Dynamo source path of ``nn_module_stack``.

    The root is whatever local the compiled function received the model as: ``L['self']`` for a
    compiled module, ``L['args'][0]`` when the forward sits under a ``*args`` decorator (as in
    transformers >= 5.2x), ``L['fn']``...; after it come attribute accesses, written by torch
    versions as ``.layers.0``, ``.layers[0]``, ``._modules['layers']._modules['0']`` or
    ``getattr(..., '0')``."""
    while True:  # getattr(getattr(L['self'].a, '0'), 'b') -> L['self'].a.0.b
        unwrapped = _GETATTR.sub(r"\1.\2", source)
        if unwrapped == source:
            break
        source = unwrapped
    rest = _ROOT.sub("", source, count=1)
    rest = _SUBSCRIPT.sub(lambda m: "." + (m.group(1) if m.group(1) is not None else m.group(2)), rest)
    return rest.strip(".") or "<root>"


def module_of(node: torch.fx.Node):
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return module_path(str(path[0] if isinstance(path, tuple) else path))
    return None


def _describe(q: torch.fx.Node, kind: str, matched: bool, reason: str, kw: dict, graph_id: int):
    x, qd = _val(q.args[0]), _val(q.args[1])
    a = _val(kw.get("ec_A"))
    rec = MatchRecord(
        node=q.name, module=module_of(q), matched=matched, kind=kind, reason=reason,
        x_shape=tuple(x.shape) if x is not None else (), n=qd.shape[0] if qd is not None else 0,
        k=x.shape[-1] if x is not None else 0, group_size=q.args[5] if len(q.args) > 5 else 0,
        dtype=str(x.dtype).replace("torch.", "") if x is not None else "",
        rank=a.shape[0] if a is not None else 0, gated="gate_w" in kw, bias=q.args[4] is not None,
        graph=graph_id)
    rec.extra["node"] = q
    return rec


# ---- the pass ----------------------------------------------------------------------------
class FuseQuantizedLinearPass(SpearGraphPass):
    """Rewrites matched subgraphs into one ``spear::fused_linear`` each; logs every qlinear."""

    def __init__(self):
        self.ec_pass = PatternMatcherPass(pass_name="spear_fuse_ec")
        self.plain_pass = PatternMatcherPass(pass_name="spear_fuse_qlinear")
        self._reasons: dict = {}
        self._log: list = []
        self._graph_id = 0
        for pattern, gate in ec_patterns():
            self._register(pattern, self.ec_pass, "ec-static" if gate == "none" else "ec-gated")
        self._register(_qlinear(), self.plain_pass, "plain")

    def _register(self, pattern, pass_dict, kind):
        def check(match: Match) -> bool:
            q = self._qlinear_node(match)
            why = check_operands(match.kwargs)
            out, ref = _val(match.output_node()), _val(q)
            if not why and (out is None or ref is None or out.shape != ref.shape or out.dtype != ref.dtype):
                why = "matched chain's output shape/dtype differs from the quantized linear's"
            if not why and kind == "plain" and _ec_like(q):
                ec_why = self._reasons.get(q, "")  # an EC pattern that matched the chain but refused its operands
                why = "feeds an add with a low-rank branch from the same input that matches no EC pattern" + \
                      (f" (the EC pattern refused it: {ec_why})" if ec_why.startswith("ec") else "")
            if why:
                self._reasons[q] = f"{kind}: {why}"
            return not why

        def rewrite(match: Match, **kw):
            q = self._qlinear_node(match)
            root = match.output_node()
            graph = match.graph
            args = (kw["x"], kw["qdata"], kw["scale"], kw["zero"], kw["bias"], kw["group_size"],
                    kw.get("ec_A"), kw.get("ec_B"), kw.get("gate_w"), kw.get("gate_b"))
            self._log.append(_describe(q, kind, True, "fused", kw, self._graph_id))
            with graph.inserting_before(root):
                new = graph.call_function(FUSED, args)
            new.meta.update({k: v for k, v in root.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
            new.meta["spear_qlinear"], new.meta["spear_module"] = q.name, module_of(q)  # for the grouping pass
            root.replace_all_uses_with(new)
            match.erase_nodes()

        register_graph_pattern(pattern, extra_check=check, pass_dict=pass_dict)(rewrite)

    @staticmethod
    def _qlinear_node(match: Match) -> torch.fx.Node:
        return next(n for n in match.nodes if n.target is QLINEAR)

    def __call__(self, graph: torch.fx.Graph, ctx: PassContext) -> int:
        """Run on ``graph``; returns the number of fused subgraphs."""
        self._reasons, self._log = {}, []
        self._graph_id = ctx.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        count = self.ec_pass.apply(graph) + self.plain_pass.apply(graph)
        graph.eliminate_dead_code()
        for q in graph.find_nodes(op="call_function", target=QLINEAR):
            reason = self._reasons.get(q, "no pattern matched")
            self._log.append(_describe(q, "unfused", False, reason, {}, self._graph_id))
            warnings.warn(f"spear_compile: {q.name} (module {module_of(q) or '?'}) left as the reference "
                          f"spear::qlinear, not fused: {reason}", stacklevel=2)
        ctx.records.matches.extend(sorted(self._log, key=lambda r: order.get(r.extra.pop("node"), 0)))
        return count
