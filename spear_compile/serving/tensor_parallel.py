"""Tensor-parallel serving: rank 0 drives, the other ranks follow (``spear-compile serve --tp N``, or
``start_engine`` in a script launched by ``torchrun --nproc-per-node N``).

Every rank loads the checkpoint, quantizes it, loads the ECs, ``parallelize``s it over the TP mesh (on CUDA also
``enable_peer_reduce``) and starts its own ``ModelRunner`` with the same buckets and the same number of KV blocks (the
fewest any rank can hold): the same compiled graphs, over its local heads. Rank 0 builds the ``Engine`` (scheduler,
sampler, detokenizer; the server). Its runner hands every step's int64 inputs to a ``StepChannel`` before the
forward; the channel broadcasts them over a CPU (gloo) control group and the other ranks run the same forward, whose
row-parallel all-reduces pair with rank 0's, and drop the logits (the LM head is replicated: rank 0's logits are the
model's). vLLM's driver / worker split is the model (it broadcasts through a shared-memory ring; this is the plain
form, two small broadcasts a step). ``Engine.close()`` or rank 0's exit sends a stop.

Failure semantics: a step that fails on rank 0 before its inputs are broadcast fails its requests only; one that
fails after (in the forward, in sampling) exits rank 0 with a message, since the ranks' collectives can no longer
pair (``StepChannel.fail``), and the launcher stops the others; a follower that fails exits likewise. After
``close()`` a step fails its requests instead of running a forward no other rank would join.
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import SpearError
from .config import EngineConfig

OP_STOP, OP_DECODE, OP_MIXED = 0, 1, 2
HEADER = 6          # op, use_ec, batch, width, number of tensors, payload length
MAX_DIMS = 2        # the runner's step inputs are 1-D or 2-D


@dataclass
class StepMessage:
    op: int
    use_ec: bool
    batch: int = 0
    width: int = 0
    tensors: tuple = ()


class StepChannel:
    """Broadcasts each step's inputs from the group's rank 0 (``decode`` / ``mixed`` / ``stop``) and receives them
    on the other ranks (``receive``). ``group``: a gloo process group (CPU tensors)."""

    def __init__(self, group):
        self.group = group
        self.src = dist.get_global_rank(group, 0)
        self.steps_sent = 0
        self.closed = False
        self._lock = threading.Lock()   # a stop from another thread (``Engine.close``) never splits a message

    def _send(self, op: int, use_ec: bool, batch: int, width: int, tensors: tuple) -> None:
        with self._lock:
            if self.closed:
                raise SpearError("tensor-parallel engine: closed (the other ranks have left their step loop)")
            self._send_locked(op, use_ec, batch, width, tensors)
            self.steps_sent += 1

    def _send_locked(self, op: int, use_ec: bool, batch: int, width: int, tensors: tuple) -> None:
        desc = []
        for t in tensors:
            if t.dim() > MAX_DIMS:
                raise SpearError(f"StepChannel: a {t.dim()}-D step input (at most {MAX_DIMS})")
            desc += [t.dim()] + list(t.shape) + [0] * (MAX_DIMS - t.dim())
        payload = torch.cat([torch.tensor(desc, dtype=torch.int64)] + [t.reshape(-1) for t in tensors]) \
            if tensors else torch.zeros(0, dtype=torch.int64)
        header = torch.tensor([op, int(use_ec), batch, width, len(tensors), payload.numel()], dtype=torch.int64)
        dist.broadcast(header, self.src, group=self.group)
        if payload.numel():
            dist.broadcast(payload, self.src, group=self.group)

    def decode(self, use_ec: bool, batch: int, width: int, flat: torch.Tensor) -> None:
        self._send(OP_DECODE, use_ec, batch, width, (flat,))

    def mixed(self, use_ec: bool, args: tuple) -> None:
        self._send(OP_MIXED, use_ec, 0, 0, tuple(args))

    def stop(self) -> None:
        with self._lock:
            if not self.closed:
                self._send_locked(OP_STOP, False, 0, 0, ())
                self.closed = True

    @staticmethod
    def fail(error: BaseException) -> None:
        """Rank 0's step failed after its inputs went to the other ranks: they ran (or are running) its collectives,
        which rank 0's next step would now pair wrongly, so no step can ever be trusted again. Exit at once (the
        launcher then stops every rank) rather than hang or serve wrong tokens."""
        print(f"spear_compile: error: tensor-parallel step failed on rank 0 after the other ranks received it "
              f"({type(error).__name__}: {error}); the ranks' collectives can no longer pair: exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    def receive(self) -> StepMessage:
        header = torch.zeros(HEADER, dtype=torch.int64)
        dist.broadcast(header, self.src, group=self.group)
        op, use_ec, batch, width, count, length = header.tolist()
        if not length:
            return StepMessage(op, bool(use_ec), batch, width)
        payload = torch.zeros(length, dtype=torch.int64)
        dist.broadcast(payload, self.src, group=self.group)
        at = count * (1 + MAX_DIMS)
        desc = payload[:at].tolist()
        tensors = []
        for i in range(count):
            ndim, *dims = desc[i * (1 + MAX_DIMS):(i + 1) * (1 + MAX_DIMS)]
            shape = dims[:ndim]
            n = math.prod(shape)
            tensors.append(payload[at:at + n].view(shape))
            at += n
        return StepMessage(op, bool(use_ec), batch, width, tuple(tensors))


def follow(runner, channel: StepChannel) -> int:
    """A follower rank's loop: run every step rank 0 broadcasts until it sends a stop; returns the steps run."""
    steps = 0
    while True:
        msg = channel.receive()
        if msg.op == OP_STOP:
            return steps
        if msg.op == OP_DECODE:
            runner.run_decode(msg.use_ec, msg.batch, msg.width, msg.tensors[0])
        elif msg.op == OP_MIXED:
            runner.run_mixed(msg.use_ec, msg.tensors)
        else:
            raise SpearError(f"tensor-parallel follower: unknown step op {msg.op}")
        steps += 1


def _init_distributed(device: Optional[str]) -> tuple:
    """(rank, world, this rank's device); the process group is created from torchrun's environment if needed."""
    from ..options import torchrun_launch
    launch = torchrun_launch()
    want_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if want_cuda and not torch.cuda.is_available():
        raise SpearError(f"tensor-parallel serving: device {device!r} asked for, but no CUDA device is available")
    if not dist.is_initialized():
        if launch.world_size is None:
            raise SpearError("tensor-parallel serving: not launched by torchrun (start it with `torchrun "
                             "--nproc-per-node N ...`, or use `spear-compile serve --tp N`)")
        if want_cuda:
            local = launch.local_rank or 0
            if local >= torch.cuda.device_count():
                raise SpearError(f"tensor-parallel serving: LOCAL_RANK {local} but {torch.cuda.device_count()} "
                                 "CUDA devices")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if want_cuda:
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    return rank, world, dev


def start_engine(model_path: str, quant: Optional[str] = "w4-pc-rtn", ec: Optional[str] = None,
                 config: Optional[EngineConfig] = None, quantize_lm_head: bool = False, peer_reduce: bool = True,
                 model_name: Optional[str] = None):
    """Every rank of a ``torchrun`` job calls this with the same arguments. Rank 0 gets the ``Engine`` (serve with
    it; ``engine.close()`` when done, or just exit); every other rank serves rank 0's steps inside this call and
    gets ``None`` when rank 0 closes. ``config.device``: ``cuda`` (rank r on ``cuda:LOCAL_RANK``, NCCL) or ``cpu``
    (gloo). ``peer_reduce``: on CUDA, row-parallel EC layers exchange ``u`` through the peer-reduction epilogue in
    compiled decode graphs (``distributed.peer_reduce``); otherwise the all-reduce fallback."""
    import dataclasses

    from ..distributed import parallelize
    from .engine import Engine, load_model
    from .model_runner import ModelRunner, kv_blocks_that_fit

    config = config or EngineConfig()
    if not isinstance(config, EngineConfig):
        raise SpearError(f"start_engine: config must be an EngineConfig, got {type(config).__name__}")
    rank, world, device = _init_distributed(config.device)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
    control = dist.new_group(backend="gloo")   # apart from the model's collectives, on CPU (gloo) as well
    model, tokenizer, config = load_model(model_path, quant, ec, config, quantize_lm_head, device=str(device))
    parallelize(model, mesh)
    if device.type == "cuda":
        torch.cuda.empty_cache()   # the cut-away weights' memory, for the KV cache sized below
    if device.type == "cuda" and peer_reduce and config.compile:
        from ..distributed.peer_reduce import enable_peer_reduce
        enable_peer_reduce(model)
    # every rank must hold the same KV blocks (same buckets, same graphs): the fewest any rank fits
    blocks = torch.tensor([kv_blocks_that_fit(model, config, device)], dtype=torch.int64)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=control)
    config = dataclasses.replace(config, num_blocks=int(blocks.item()))
    channel = StepChannel(control)
    if rank != 0:
        follow(ModelRunner.start(model, config, device), channel)
        return None
    engine = Engine(model, tokenizer, config, step_channel=channel,
                    model_name=model_name or os.path.basename(os.path.normpath(str(model_path))))
    atexit.register(_close_at_exit, engine)  # rank 0 leaving without close() still releases the followers
    return engine


def _close_at_exit(engine) -> None:
    try:
        engine.close()
    except Exception:  # noqa: BLE001  (the process group is already gone: the followers' broadcast fails too)
        pass
