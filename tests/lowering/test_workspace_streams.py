"""Decode workspaces are per (device, stream): two streams decoding at once never share split-K counters, EC
epochs or slots. The GPU test launches the same decode configs on two streams concurrently (no sync between
them) and compares every output with the same call run alone on one stream."""
import pytest
import torch

from spear_compile.lowering import configs, dispatch, runtime, workspace
from tests.w4_problems import problem, reference, rel

D = configs.DecodeConfig


def test_one_workspace_per_device_and_stream_off_cuda():
    pool = workspace.Workspaces()
    cpu = torch.device("cpu")
    assert pool.get(cpu) is pool.get(cpu)
    assert workspace.stream_key(cpu) == ("cpu", None, 0)
    pool.clear()
    assert pool.get(cpu) is not None


def test_footprint_changes_exactly_when_a_buffer_is_allocated():
    """``Workspace.footprint()`` (the serving engine's check that a CUDA-graph capture allocated no workspace):
    equal while nothing is allocated, different after any kind of buffer is."""
    ws = workspace.Workspaces().get(torch.device("cpu"))
    before = ws.footprint()
    assert ws.footprint() == before
    for grow in (lambda: ws.for_n(64), lambda: ws.for_epoch(64, 4), lambda: ws.for_slots(64, 4, 2, 32, term=True),
                 lambda: ws.for_group(96), lambda: ws.for_batched(16, 16, 4)):
        grow()
        after = ws.footprint()
        assert after != before
        before = after
    ws.for_n(64)   # already there: nothing new
    assert ws.footprint() == before


def test_outgrown_batched_buffers_stay_alive():
    """A graph captured before the batched buffers grew replays into the old ones: they must not be freed (and
    handed to other tensors) when a later, smaller batch's pick needs more split-K slots."""
    import weakref
    ws = workspace.Workspaces().get(torch.device("cpu"))
    first = ws.for_batched(64, 16, 4)
    refs = [weakref.ref(t) for t in first]
    ptrs = [t.data_ptr() for t in first]
    del first
    grown = ws.for_batched(128, 16, 4)
    assert grown[0].numel() == 128 and grown[1].numel() == 16
    assert all(r() is not None for r in refs) and [t.data_ptr() for t in ws.outgrown[0]] == ptrs
    assert ws.for_batched(100, 8, 2) is grown and len(ws.outgrown) == 1   # fits: nothing replaced


@pytest.mark.gpu
def test_two_streams_get_their_own_workspaces():
    dev = torch.device("cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(s1):
        w1 = runtime.WORKSPACES.get(dev)
    with torch.cuda.stream(s2):
        w2 = runtime.WORKSPACES.get(dev)
    assert w1 is not w2 and w1.sync.data_ptr() != w2.sync.data_ptr()
    with torch.cuda.stream(s1):
        assert runtime.WORKSPACES.get(dev) is w1


# split-K W4-only (acc + arrival counters), and the EC modes that keep state between launches
STREAM_CASES = [
    (1, False, D(16, 128, 8, 2)),
    (1, True, D(16, 128, 4, 2, ec="spin")),
    (1, True, D(16, 128, 4, 2, ec="epoch")),
    (1, True, D(16, 128, 4, 2, ec="slots")),
    (4, True, D(32, 128, 4, 4, kernel="v3", ec="epoch")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,ec,cfg", STREAM_CASES, ids=[c[2].name for c in STREAM_CASES])
def test_decode_on_two_streams_at_once_matches_one_stream(m, ec, cfg):
    k, n, r, group = 4096, 4096, 32, 128
    cpu = [problem(m, group, torch.bfloat16, ec, True, True, seed, k=k, n=n, r=r) for seed in (11, 12)]
    refs = [reference(t, group) for t in cpu]
    probs = [{key: (v.cuda() if torch.is_tensor(v) else v) for key, v in t.items()} for t in cpu]

    def run(t):
        return dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group, t["ec_A"], t["ec_B"],
                               t["gate_w"], t["gate_b"], config=cfg)

    alone = [run(t) for t in probs]  # one stream, one after the other
    torch.cuda.synchronize()
    for y, ref in zip(alone, refs):
        assert rel(y.cpu(), ref) < 1e-2
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    outs = [[], []]
    for _ in range(20):  # interleaved launches, no synchronisation between the two streams
        for i, (s, t) in enumerate(zip(streams, probs)):
            with torch.cuda.stream(s):
                outs[i].append(run(t))
    torch.cuda.synchronize()
    for i in range(2):  # (split-K sums may differ in the last bits from run to run: compared with a tolerance)
        for y in outs[i]:
            assert rel(y.cpu(), refs[i]) < 1e-2, f"stream {i}: {cfg.name} wrong when run beside another stream"
            assert rel(y.cpu(), alone[i].cpu().double()) < 2e-3


def test_outside_graph_pools_runs_on_its_own_thread_in_the_callers_state():
    """The thread that makes workspaces and tunes outside any CUDA-graph pool: another thread, the caller's grad
    mode, its value returned and its exception raised in the caller."""
    import threading
    caller = threading.get_ident()
    seen = {}

    def probe():
        seen.update(thread=threading.get_ident(), grad=torch.is_grad_enabled())
        return 7

    with torch.no_grad():
        assert workspace.outside_graph_pools(probe) == 7
    assert seen == {"thread": seen["thread"], "grad": False} and seen["thread"] != caller
    assert workspace.outside_graph_pools(lambda: torch.is_grad_enabled()) is True
    with torch.inference_mode():
        out = torch.zeros(3)
        workspace.outside_graph_pools(lambda: out.add_(1))   # in place on an inference tensor: inference mode too
    assert out.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="boom"):
        workspace.outside_graph_pools(lambda: (_ for _ in ()).throw(ValueError("boom")))
