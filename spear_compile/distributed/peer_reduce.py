"""Peer-reduction EC epilogue for row-parallel W4 + EC linears (issue 19, item 3).

**Untested on multi-GPU hardware.** Only the kernel's math and its flag / epoch / parity protocol are
tested, on CPU under ``TRITON_INTERPRET=1`` with simulated ranks (``tests/distributed/test_tp_peer_reduce.py``: every
rank's buffers in one process, each launch split in two phases so a sequential interpreter never waits on
a rank that has not run). The real-hardware checks to run when ``nvidia-h200-x2``/``-x4`` are lent are in
``docs/tensor_parallel.md``.

In a row-parallel linear each rank holds a K-slice, so the EC's ``u = A x`` is a partial sum and the gate
needs the full one. The fallback (``layers.py``) all-reduces ``u`` with a separate collective. Here one
launch per layer and rank does it all:

* programs ``0 .. R_SPLIT-1`` ("u programs") each compute ``u`` over a K-chunk and *dual-write* it (fp32)
  into slot ``[parity, rank, chunk]`` of every rank's symmetric buffer, its own included, then raise flag
  ``[rank, chunk]`` on every rank's signal pad to ``epoch + 1`` (release, system scope);
* the other programs ("N tiles") compute their ``y`` tile of the W4 GEMV over the local K-slice, then wait
  until all ``world * R_SPLIT`` flags of their own signal pad reach ``epoch + 1`` (acquire), sum the
  partials in a fixed order (the same bits on every rank), apply the gate and ``B``, and add ``v`` to the
  tiles this rank owns (tile ``t`` belongs to rank ``t % world``), so the y all-reduce that follows adds
  each part of the EC term exactly once and the ``B`` work is spread over the ranks.

CUDA-graph safety, without reset launches or host-side counters: the epoch of each layer slot lives in
device memory; every program reads it at its start and the last program to finish (a completion counter
it resets) increments it. Flags are monotonic (``epoch + 1``, compared with wrap-around), so they are never
reset; the ``u`` slots alternate by parity, so a rank one call ahead never overwrites partials a peer is
still reading. Buffers are allocated and rendezvoused once (``PeerReduceWorkspace.allocate``) before
capture. Forward progress relies on the u programs (lowest block ids, no waits) being scheduled before the
N tiles that wait for them, as decoupled look-back kernels do. Multicast stays off
(``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1``): only unicast peer stores are used.

The W4 GEMV here is a plain tiled one (dequantize a ``[BLOCK_N, BLOCK_K]`` tile, ``tl.dot``), not the tuned
decode kernels of ``spear_compile.lowering``; moving this epilogue into those is the next step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ..errors import SpearError
from ..options import interpret as _interpret
from ..kernels.tl_helpers import dot

MAX_M = 16            # decode batch rows handled by one launch
RESERVED_FLAGS = 64   # the first int32 words of each signal pad are left to symmetric memory's own barrier


@triton.jit
def _peer_pointer(ptr_array, peer, dtype: tl.constexpr):
    """Rank ``peer``'s base pointer from a device array of uint64 pointers (``buffer_ptrs_dev``)."""
    return tl.load(ptr_array.to(tl.pointer_type(tl.uint64)) + peer).to(tl.pointer_type(dtype))


@triton.jit
def peer_reduce_row_ec_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, a_ptr, b_ptr, gw_ptr, gb_ptr, y_ptr,
    buf_ptrs, flag_ptrs, epoch_ptr, done_ptr, buf_offset, flag_offset,
    M, N, K, R, GROUPS, K_CHUNK, TOTAL_PROGRAMS,
    GROUP_SIZE: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, R_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GATED: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, PHASE: tl.constexpr, INTERPRET: tl.constexpr,
):
    # PHASE 0: one launch of R_SPLIT + N-tile programs. PHASE 1 / 2: only the u programs / only the N
    # tiles (the CPU simulation runs every rank's phase 1 before any phase 2).
    pid = tl.program_id(0) + (R_SPLIT if PHASE == 2 else 0)
    epoch = tl.load(epoch_ptr, volatile=True)
    target = epoch + 1
    parity = epoch % 2
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    slot_elems = BLOCK_M * BLOCK_R
    tile2d = offs_m[:, None] * BLOCK_R + offs_r[None, :]
    if pid < R_SPLIT:
        # ---- u program: partial u over a K-chunk, written into every rank's buffer, then flagged ----
        k_start = pid * K_CHUNK
        k_stop = tl.minimum(k_start + K_CHUNK, K)
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < k_stop
            xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                         mask=(offs_m[:, None] < M) & kmask[None, :], other=0.0)
            at = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                         mask=(offs_r[:, None] < R) & kmask[None, :], other=0.0)
            u += tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)), input_precision="ieee")
        slot = buf_offset + ((parity * WORLD + RANK) * R_SPLIT + pid) * slot_elems
        for peer in tl.static_range(WORLD):  # the dual write: every peer's buffer, this rank's own included
            tl.store(_peer_pointer(buf_ptrs, peer, tl.float32) + slot + tile2d, u)
        tl.debug_barrier()  # all threads' stores before the release below
        for peer in tl.static_range(WORLD):
            flag = _peer_pointer(flag_ptrs, peer, tl.int32) + flag_offset + RANK * R_SPLIT + pid
            tl.atomic_xchg(flag, target, sem="release", scope="sys")
    else:
        # ---- N tile: W4 GEMV tile over the local K-slice ----
        tile = pid - R_SPLIT
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        half_k = K // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            xt = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                         mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            packed = tl.load(q_ptr + offs_n[:, None] * half_k + offs_b[None, :],
                             mask=nmask[:, None] & (offs_b[None, :] < half_k), other=0)
            codes = tl.join(packed & 0xF, packed >> 4).reshape(BLOCK_N, BLOCK_K)  # byte j: codes 2j (low), 2j+1 (high)
            gmask = nmask[:, None] & (offs_k[None, :] < K)
            gidx = offs_n[:, None] * GROUPS + offs_k[None, :] // GROUP_SIZE
            scale = tl.load(s_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)
            w = ((codes.to(tl.float32) - zero) * scale).to(xt.dtype)
            acc = dot(xt, tl.trans(w), acc, INTERPRET)
        # ---- wait for every rank's partial u, reduce in a fixed order ----
        own_flags = _peer_pointer(flag_ptrs, RANK, tl.int32) + flag_offset
        for i in range(WORLD * R_SPLIT):
            seen = tl.atomic_add(own_flags + i, 0, sem="acquire", scope="sys")
            while seen - target < 0:  # monotonic flags, compared with wrap-around
                seen = tl.atomic_add(own_flags + i, 0, sem="acquire", scope="sys")
        tl.debug_barrier()
        partials = _peer_pointer(buf_ptrs, RANK, tl.float32) + buf_offset + parity * WORLD * R_SPLIT * slot_elems
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for i in range(WORLD * R_SPLIT):
            u += tl.load(partials + i * slot_elems + tile2d, volatile=True)
        rmask = offs_r < R
        if GATED:
            gw = tl.load(gw_ptr + offs_r[:, None] * R + offs_r[None, :],
                         mask=rmask[:, None] & rmask[None, :], other=0.0)
            h = tl.dot(u, tl.trans(gw.to(tl.float32)), input_precision="ieee")
            if HAS_GATE_BIAS:
                h += tl.load(gb_ptr + offs_r, mask=rmask, other=0.0).to(tl.float32)[None, :]
            u = u * (2.0 * tl.sigmoid(h))
        if tile % WORLD == RANK:  # each v tile is added by one rank: the y all-reduce sums it once
            bt = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
            acc += tl.dot(u, tl.trans(bt.to(tl.float32)), input_precision="ieee")
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & nmask[None, :])
    # ---- the last program of this call advances the slot's epoch (no host counter, no reset launch) ----
    finished = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == TOTAL_PROGRAMS - 1:
        tl.atomic_xchg(done_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(epoch_ptr, target, sem="release", scope="gpu")


@dataclass
class PeerReduceWorkspace:
    """Per-rank state of the u exchange for ``slots`` row-parallel layers (one slot each).

    ``buffer_ptrs_dev`` / ``signal_pad_ptrs_dev``: device arrays of the ranks' buffer / signal-pad base
    pointers (``_SymmetricMemory`` handle attributes). Build it with :meth:`allocate` (collective, before
    any CUDA-graph capture); the tests build it from simulated per-rank CPU tensors.
    """

    buffer_ptrs_dev: int
    signal_pad_ptrs_dev: int
    rank: int
    world: int
    slots: int
    r_split: int
    block_r: int
    epoch: torch.Tensor          # int32 [slots], local
    done: torch.Tensor           # int32 [slots], local
    keepalive: Any = field(default=None, repr=False)  # the symmetric tensor and handle

    @property
    def slot_floats(self) -> int:
        return 2 * self.world * self.r_split * MAX_M * self.block_r

    def slot_args(self, slot: int) -> dict:
        """The op's scalar arguments for layer slot ``slot``."""
        return dict(buffer_ptrs=self.buffer_ptrs_dev, signal_pad_ptrs=self.signal_pad_ptrs_dev, rank=self.rank,
                    world=self.world, r_split=self.r_split, block_r=self.block_r, buf_offset=slot * self.slot_floats,
                    flag_offset=RESERVED_FLAGS + slot * self.world * self.r_split)

    @staticmethod
    def sizes(world: int, slots: int, r_split: int, max_rank: int) -> tuple:
        """``(block_r, buffer floats, signal-pad bytes)`` a workspace needs."""
        block_r = max(16, triton.next_power_of_2(max_rank))
        return block_r, slots * 2 * world * r_split * MAX_M * block_r, 4 * (RESERVED_FLAGS + slots * world * r_split)

    @classmethod
    def allocate(cls, group_name: str, slots: int, max_rank: int = 64, r_split: int = 4,
                 device: Optional[torch.device] = None) -> "PeerReduceWorkspace":
        """Allocate and rendezvous the symmetric buffer (collective over the group; CUDA only)."""
        import torch.distributed._symmetric_memory as symm_mem
        device = torch.device(device or torch.cuda.current_device())
        world = torch.distributed.get_world_size(torch.distributed.distributed_c10d._resolve_process_group(group_name))
        block_r, floats, pad_bytes = cls.sizes(world, slots, r_split, max_rank)
        if pad_bytes > symm_mem.get_signal_pad_size():
            raise SpearError(f"peer reduce: {slots} layer slots x {world} ranks x {r_split} chunks need {pad_bytes} "
                             f"bytes of signal pad, {symm_mem.get_signal_pad_size()} are configured: call "
                             f"torch.distributed._symmetric_memory.set_signal_pad_size before the first symmetric "
                             f"allocation, or use one workspace per group of layers")
        buf = symm_mem.empty(floats, dtype=torch.float32, device=device).zero_()
        hdl = symm_mem.rendezvous(buf, group_name)
        hdl.barrier()  # every rank's buffer is zeroed before any peer writes into it
        return cls(hdl.buffer_ptrs_dev, hdl.signal_pad_ptrs_dev, hdl.rank, hdl.world_size, slots, r_split, block_r,
                   torch.zeros(slots, dtype=torch.int32, device=device),
                   torch.zeros(slots, dtype=torch.int32, device=device), keepalive=(buf, hdl))


def peer_reduce_row_ec(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                       ec_A: torch.Tensor, ec_B: torch.Tensor, gate_w: Optional[torch.Tensor],
                       gate_b: Optional[torch.Tensor], ws: PeerReduceWorkspace, slot: int, *, phase: int = 0,
                       block_n: int = 64, block_k: int = 64, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's ``y`` of a row-parallel W4 + EC linear: ``W_local x_local``, plus the EC term (from the
    peer-reduced ``u``) on the N tiles this rank owns. The caller all-reduces ``y`` (the usual y collective).

    ``x [M, K_local]`` (M <= 16), ``qdata [N, K_local/2]`` uint8, ``scale``/``zero [N, K_local/group_size]``,
    ``ec_A [r, K_local]``, ``ec_B [N, r]``, ``gate_w [r, r]`` / ``gate_b [r]`` or None (static EC).
    ``phase``: 0 in real use; 1 and 2 split the launch for the CPU simulation (see the module docstring).
    """
    m, k = x.shape
    n, r = qdata.shape[0], ec_A.shape[0]
    if qdata.dtype != torch.uint8 or tuple(qdata.shape) != (n, k // 2) or k % 2:
        raise SpearError(f"peer reduce: qdata {tuple(qdata.shape)} {qdata.dtype} is not a 4-bit container for K={k}")
    if k % group_size or tuple(scale.shape) != (n, k // group_size) or tuple(zero.shape) != (n, k // group_size):
        raise SpearError(f"peer reduce: scale/zero {tuple(scale.shape)} inconsistent with N={n}, K={k}, "
                         f"group_size={group_size}")
    if tuple(ec_A.shape) != (r, k) or tuple(ec_B.shape) != (n, r) or r > ws.block_r:
        raise SpearError(f"peer reduce: EC A {tuple(ec_A.shape)} / B {tuple(ec_B.shape)} inconsistent with "
                         f"N={n}, K={k} or rank above the workspace's {ws.block_r}")
    if not 0 <= slot < ws.slots:
        raise SpearError(f"peer reduce: slot {slot} outside the workspace's {ws.slots}")
    return _launch(x, qdata, scale, zero, group_size, ec_A, ec_B, gate_w, gate_b, ws, slot, phase,
                   block_n, block_k, out)


def _launch(x, qdata, scale, zero, group_size, ec_A, ec_B, gate_w, gate_b, ws, slot, phase, block_n=64, block_k=64,
            out=None, buf_offset=None, flag_offset=None):
    m, k = x.shape
    n, r = qdata.shape[0], ec_A.shape[0]
    if m > MAX_M:
        raise SpearError(f"peer reduce: M={m} rows, the decode epilogue handles at most {MAX_M}")
    x, qdata, scale, zero, ec_A, ec_B = (t.contiguous() for t in (x, qdata, scale, zero, ec_A, ec_B))
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if buf_offset is None:
        buf_offset, flag_offset = ws.slot_args(slot)["buf_offset"], ws.slot_args(slot)["flag_offset"]
    n_tiles = triton.cdiv(n, block_n)
    k_chunk = triton.cdiv(triton.cdiv(k, ws.r_split), block_k) * block_k
    grid = {0: ws.r_split + n_tiles, 1: ws.r_split, 2: n_tiles}[phase]
    gated = gate_w is not None
    peer_reduce_row_ec_kernel[(grid,)](
        x, qdata, scale, zero, ec_A, ec_B, gate_w if gated else ec_A, gate_b if gate_b is not None else ec_A, y,
        ws.buffer_ptrs_dev, ws.signal_pad_ptrs_dev, ws.epoch[slot:], ws.done[slot:], buf_offset, flag_offset,
        m, n, k, r, k // group_size, k_chunk, ws.r_split + n_tiles,
        GROUP_SIZE=group_size, RANK=ws.rank, WORLD=ws.world, R_SPLIT=ws.r_split,
        BLOCK_M=MAX_M, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=ws.block_r,
        GATED=gated, HAS_GATE_BIAS=gate_b is not None, PHASE=phase, INTERPRET=_interpret(),
    )
    return y


# ---- the op a row-parallel module calls (opaque to torch.compile; CUDA-graph capturable) -----------------
@torch.library.custom_op("spear::peer_reduce_row_ec", mutates_args=("epoch", "done"))
def peer_reduce_row_ec_op(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          group_size: int, ec_A: torch.Tensor, ec_B: torch.Tensor, gate_w: Optional[torch.Tensor],
                          gate_b: Optional[torch.Tensor], epoch: torch.Tensor, done: torch.Tensor, buffer_ptrs: int,
                          signal_pad_ptrs: int, rank: int, world: int, r_split: int, block_r: int,
                          buf_offset: int, flag_offset: int, phase: int = 0) -> torch.Tensor:
    """``peer_reduce_row_ec`` on one layer slot given as plain values: ``epoch``/``done`` are the slot's
    one-element counters, ``buf_offset``/``flag_offset`` its offsets (see ``PeerReduceWorkspace.slot_args``)."""
    ws = PeerReduceWorkspace(buffer_ptrs, signal_pad_ptrs, rank, world, 1, r_split, block_r, epoch, done)
    flat = x.reshape(-1, x.shape[-1])
    y = _launch(flat, qdata, scale, zero, group_size, ec_A, ec_B, gate_w, gate_b, ws, 0, phase,
                buf_offset=buf_offset, flag_offset=flag_offset)
    return y.reshape(*x.shape[:-1], qdata.shape[0])


@peer_reduce_row_ec_op.register_fake
def _(x, qdata, scale, zero, group_size, ec_A, ec_B, gate_w, gate_b, epoch, done, buffer_ptrs, signal_pad_ptrs,
      rank, world, r_split, block_r, buf_offset, flag_offset, phase=0):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


# ---- the mark a row-parallel module leaves for the compiler pass ------------------------------------------
SLOT_FIELDS = ("buffer_ptrs", "signal_pad_ptrs", "rank", "world", "r_split", "block_r", "buf_offset", "flag_offset")


@torch.library.custom_op("spear::peer_reduce_slot", mutates_args=())
def peer_reduce_slot(u_partial: torch.Tensor, epoch: torch.Tensor, done: torch.Tensor, buffer_ptrs: int,
                     signal_pad_ptrs: int, rank: int, world: int, r_split: int, block_r: int, buf_offset: int,
                     flag_offset: int) -> torch.Tensor:
    """A copy of ``u_partial``: marks the EC's partial ``u`` of a row-parallel layer as exchangeable through
    a workspace slot (``PeerReduceWorkspace.slot_args``, in ``SLOT_FIELDS`` order). The compiler pass
    ``compile/passes/peer_reduce_row_ec.py`` always removes it: it rewrites the layer to
    ``spear::peer_reduce_row_ec`` with these arguments, or leaves the all-reduce fallback without the mark.
    Outside the ``spear`` backend (eager, other backends) it is a copy of ``M x r`` values."""
    return u_partial.clone()


@peer_reduce_slot.register_fake
def _(u_partial, epoch, done, buffer_ptrs, signal_pad_ptrs, rank, world, r_split, block_r, buf_offset, flag_offset):
    return torch.empty_like(u_partial)


def enable_peer_reduce(model: torch.nn.Module, max_rank: Optional[int] = None, r_split: int = 4) -> int:
    """Give every row-parallel W4 + EC linear of a parallelized CUDA ``model`` a slot of a symmetric-memory
    workspace, so that the ``spear`` backend's pass (``compile/passes/peer_reduce_row_ec.py``) rewrites
    its decode graphs (M <= 16) to the peer-reduction epilogue; other graphs, and eager calls, keep the
    all-reduce fallback. Collective: every rank calls it, before compiling and before any CUDA-graph
    capture. Returns the number of layers given a slot. UNTESTED ON MULTI-GPU HARDWARE (module docstring)."""
    from .layers import RowParallelCompensatedLinear
    from .parallelize import tp_state
    state = tp_state(model)
    if state is None:
        raise SpearError("enable_peer_reduce: the model is not parallelized; call spear_compile.parallelize first")
    mods = [m for m in model.modules() if isinstance(m, RowParallelCompensatedLinear) and "_spear_qdata" in m._buffers
            and m._spear_qdata.is_cuda and m._spear_qdata.shape[1] * 2 == m.in_features]
    if not mods:
        return 0
    import torch.distributed._symmetric_memory as symm_mem
    per_ws = (symm_mem.get_signal_pad_size() // 4 - RESERVED_FLAGS) // (state.layout.world * r_split)
    if per_ws < 1:
        raise SpearError(f"enable_peer_reduce: a {symm_mem.get_signal_pad_size()}-byte signal pad holds no layer slot "
                         f"of {state.layout.world} ranks x {r_split} chunks")
    workspaces = []
    for first in range(0, len(mods), per_ws):  # as many symmetric allocations as the signal pads require
        group = mods[first:first + per_ws]
        ws = PeerReduceWorkspace.allocate(state.group, len(group), max_rank or max(m.rank for m in mods), r_split,
                                          group[0]._spear_qdata.device)
        for slot, mod in enumerate(group):
            mod.attach_peer_reduce(ws.slot_args(slot), ws.epoch[slot:slot + 1], ws.done[slot:slot + 1])
        workspaces.append(ws)
    model._spear_peer_workspaces = workspaces  # keeps the symmetric buffers alive
    return len(mods)
