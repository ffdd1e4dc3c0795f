"""``MixedGraphs`` bookkeeping with a fake capture (CPU): the first step of a key runs eagerly and is captured, later
steps replay into the shared logits buffer; a failed capture warns, returns the eager logits and stops capturing;
a key whose logits rows exceed the buffer is not captured; ``pack_flat`` / ``unpack_flat`` round-trip."""
import pytest
import torch

from spear_compile.serving.cuda_graphs import MixedGraphs, pack_flat, unpack_flat


class FakeGraph:
    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        self.fn()


class FakeCapture:
    """CUDA-like (``cuda`` True) without a GPU: ``capture`` records ``fn`` as the graph, or raises ``fail``."""
    cuda = True
    device = torch.device("cpu")

    def __init__(self, fail=None):
        self.fail, self.eager_runs, self.low = fail, 0, False

    def low_on_memory(self):
        return self.low

    def eager(self, fn):
        self.eager_runs += 1
        return fn()

    def capture(self, fn, what, error_mode="global"):
        if self.fail:
            raise self.fail
        return FakeGraph(fn), None


def step(x):
    return torch.stack([x.sum(0).float(), x.prod(0).float()])   # [2, vocab]: depends on every input value


def test_first_step_then_replays_into_the_shared_buffer():
    g = torch.Generator().manual_seed(0)
    mixed = MixedGraphs(FakeCapture(), limit=4, max_rows=4, capture_first=False)
    shapes = ((3, 5),)
    flat = torch.randint(1, 9, (15,), generator=g)
    views = unpack_flat(flat, shapes)
    first = mixed.first_step((True, shapes), flat, views, lambda: step(views[0]))
    assert torch.equal(first, step(views[0])) and set(mixed.graphs) == {(True, shapes)}
    graph = mixed.graphs[(True, shapes)]
    for _ in range(3):   # new inputs written into the static buffer: the replay must see them
        new = torch.randint(1, 9, (3, 5), generator=g)
        graph.inputs.copy_(pack_flat([new]))
        out = mixed.replay(graph)
        assert torch.equal(out, step(new)) and out.data_ptr() == mixed.logits.data_ptr()
    assert mixed.replays == 3 and mixed.capture.eager_runs == 1 and mixed.has_room(rows=2)


def test_failed_capture_warns_returns_eager_logits_and_stops():
    mixed = MixedGraphs(FakeCapture(fail=RuntimeError("operation not permitted when stream is capturing")),
                        limit=4, max_rows=4, capture_first=False)
    flat = torch.arange(1, 7)
    views = unpack_flat(flat, ((2, 3),))
    with pytest.warns(RuntimeWarning, match="operation not permitted"):
        out = mixed.first_step((False, ((2, 3),)), flat, views, lambda: step(views[0]))
    assert torch.equal(out, step(views[0])) and mixed.graphs == {} and not mixed.has_room(rows=2)


def test_rows_beyond_the_buffer_are_not_captured():
    """A key whose logits rows exceed the shared buffer gets no graph (the runner runs it uncaptured)."""
    mixed = MixedGraphs(FakeCapture(), limit=4, max_rows=1, capture_first=False)
    assert mixed.has_room(rows=1) and not mixed.has_room(rows=2)
    assert mixed.capture.eager_runs == 0 and mixed.graphs == {}


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randint(0, 100, s, generator=g) for s in ((4,), (2, 3), (1, 5), (0,))]
    views = unpack_flat(pack_flat(parts), [tuple(p.shape) for p in parts])
    assert all(torch.equal(a, b) for a, b in zip(parts, views))


def test_no_capture_when_the_device_is_low_on_memory():
    """Graphs captured while serving take memory beside the KV cache: once a capture leaves the device under
    ``GraphCapture.MIN_FREE_BYTES`` free, new keys run uncaptured (and captured ones still replay)."""
    mixed = MixedGraphs(FakeCapture(), limit=4, max_rows=4, capture_first=False)
    assert mixed.has_room(rows=2)
    mixed.capture.low = True
    assert not mixed.has_room(rows=2)
    from spear_compile.serving.cuda_graphs import GraphCapture
    cap = GraphCapture(torch.device("cpu"))
    assert not cap.low_on_memory()                       # nothing captured yet: nothing known
    cap.free_bytes = GraphCapture.MIN_FREE_BYTES
    assert not cap.low_on_memory()
    cap.free_bytes = GraphCapture.MIN_FREE_BYTES - 1
    assert cap.low_on_memory()


def test_covering_picks_the_least_padding_of_the_same_ec_state():
    from spear_compile.serving.buckets import MixedDims
    mixed = MixedGraphs(FakeCapture(), limit=8, max_rows=16, capture_first=False)
    step_dims = MixedDims(64, 8, 4, 2, 16, 4, 8)
    graphs = {True: [MixedDims(64, 8, 4, 2, 32, 4, 8), MixedDims(64, 8, 4, 2, 32, 8, 8), MixedDims(64, 16, 4, 2, 16, 4, 8)],
              False: [MixedDims(64, 8, 4, 2, 16, 8, 8)]}
    for use_ec, dims_list in graphs.items():
        for d in dims_list:
            flat = torch.zeros(sum(torch.Size(s).numel() for s in d.shapes()), dtype=torch.int64)
            mixed.first_step((use_ec, d.shapes()), flat, unpack_flat(flat, d.shapes()), lambda: torch.zeros(2, 3))
    assert mixed.covering(True, step_dims, 4.0) == MixedDims(64, 8, 4, 2, 32, 4, 8)   # 2x, not 4x; not 16 rows
    assert mixed.covering(True, step_dims, 1.5) is None and mixed.covering(True, step_dims, 0) is None
    assert mixed.covering(False, step_dims, 2.0) == MixedDims(64, 8, 4, 2, 16, 8, 8)
    own = MixedDims(64, 8, 4, 2, 32, 8, 8)
    assert mixed.covering(True, own, 0) == own   # a captured key is its own cover, padding or not


def test_covering_remembers_its_answer_until_a_graph_is_added():
    """A padded step's dims come back step after step: the scan over every captured graph runs once per dims, and
    again after any capture (a new graph may cover them with less padding, or cover them at all)."""
    from spear_compile.serving.buckets import MixedDims
    mixed = MixedGraphs(FakeCapture(), limit=8, max_rows=16, capture_first=False)

    def capture(d):
        flat = torch.zeros(sum(torch.Size(s).numel() for s in d.shapes()), dtype=torch.int64)
        mixed.first_step((True, d.shapes()), flat, unpack_flat(flat, d.shapes()), lambda: torch.zeros(2, 3))

    step_dims = MixedDims(64, 8, 4, 2, 16, 4, 8)
    assert mixed.covering(True, step_dims, 4.0) is None
    capture(MixedDims(64, 8, 4, 2, 32, 8, 8))                                   # 4x the attention: covers at 4
    assert mixed.covering(True, step_dims, 4.0) == MixedDims(64, 8, 4, 2, 32, 8, 8)
    scans = []
    real = MixedDims.covers
    MixedDims.covers = lambda self, other, p, b=1.0: scans.append(1) or real(self, other, p, b)
    try:
        for _ in range(5):
            assert mixed.covering(True, step_dims, 4.0) == MixedDims(64, 8, 4, 2, 32, 8, 8)
        assert not scans                                                          # remembered
        capture(MixedDims(64, 8, 4, 2, 32, 4, 8))                               # 2x: less padding
        assert mixed.covering(True, step_dims, 4.0) == MixedDims(64, 8, 4, 2, 32, 4, 8)
        assert len(scans) == 2                                                    # scanned again, both graphs
        assert mixed.covering(True, step_dims, 1.5) is None                       # another padding: its own answer
    finally:
        MixedDims.covers = real


class FlakyCapture(FakeCapture):
    """Fails its first ``times`` captures with ``fail``, then captures."""

    def __init__(self, fail, times=1):
        super().__init__()
        self.error, self.times = fail, times

    def capture(self, fn, what, error_mode="global"):
        if self.times:
            self.times -= 1
            raise self.error
        return FakeGraph(fn), None


def _key_step(mixed, ec, shapes, g):
    """A first step of a key of ``shapes`` (ids-like first input, logits rows from the last), fresh inputs; returns
    (logits, expected)."""
    flat = torch.randint(1, 9, (sum(torch.Size(s).numel() for s in shapes),), generator=g)
    views = unpack_flat(flat, shapes)
    return mixed.first_step((ec, shapes), flat, views, lambda: step(views[-1])), step(views[-1])


def test_capture_first_skips_the_eager_run_of_sizes_already_run():
    """With ``capture_first`` a new key whose tokens (first input) and logits rows (last) already ran eagerly is
    captured at once and replayed (no eager run); new tokens, new rows or the other EC state run eagerly first."""
    g = torch.Generator().manual_seed(2)
    mixed = MixedGraphs(FakeCapture(), limit=8, max_rows=4, capture_first=True)
    cap = mixed.capture
    for ec, shapes, eager in ((True, ((4,), (2, 3)), 1), (True, ((4,), (7,), (2, 3)), 1),   # same sizes: captured
                              (True, ((8,), (2, 3)), 2), (True, ((4,), (3, 3)), 3), (False, ((4,), (5,), (2, 3)), 4),
                              (True, ((4,), (6,), (2, 3)), 4)):
        out, want = _key_step(mixed, ec, shapes, g)
        assert torch.equal(out, want) and cap.eager_runs == eager and (ec, shapes) in mixed.graphs
    assert mixed.captured_first == 2 and mixed.first_steps == 6 and len(mixed.graphs) == 6
    graph = mixed.graphs[(True, ((4,), (7,), (2, 3)))]     # a graph captured first replays new inputs too
    new = [torch.randint(1, 9, s, generator=g) for s in ((4,), (7,), (2, 3))]
    graph.inputs.copy_(pack_flat(new))
    assert torch.equal(mixed.replay(graph), step(new[-1]))


def test_without_capture_first_every_key_runs_eagerly():
    g = torch.Generator().manual_seed(3)
    mixed = MixedGraphs(FakeCapture(), limit=8, max_rows=4, capture_first=False)
    for shapes in (((4,), (2, 3)), ((4,), (7,), (2, 3))):
        out, want = _key_step(mixed, True, shapes, g)
        assert torch.equal(out, want)
    assert mixed.capture.eager_runs == 2 and mixed.captured_first == 0


def _failed_capture_first(seed, error, match):
    """A capture-first engine's second key (sizes of the first) whose capture raises ``error``: warns ``match``,
    returns the right logits from one eager run, none captured first; returns the ``MixedGraphs``."""
    g = torch.Generator().manual_seed(seed)
    mixed = MixedGraphs(FakeCapture(), limit=8, max_rows=4, capture_first=True)
    _key_step(mixed, True, ((4,), (2, 3)), g)
    mixed.capture = FlakyCapture(error)
    with pytest.warns(RuntimeWarning, match=match):
        out, want = _key_step(mixed, True, ((4,), (7,), (2, 3)), g)
    assert torch.equal(out, want) and mixed.capture.eager_runs == 1 and mixed.captured_first == 0
    return mixed


def test_failed_capture_first_falls_back_to_eager_then_capture():
    """A capture-first that fails (not for kernel workspace) warns, turns capturing first off and runs the step as
    before: eagerly, then captured."""
    mixed = _failed_capture_first(4, RuntimeError("operation not permitted when stream is capturing"),
                                  "before any eager run")
    assert not mixed.capture_first and (True, ((4,), (7,), (2, 3))) in mixed.graphs and mixed.has_room(rows=2)


def test_capture_first_that_allocated_workspace_stops_capturing():
    """A capture-first that allocated kernel workspace (``SpearError``) stops all captures, as after an eager run;
    the step itself still runs (eagerly) and returns its logits."""
    from spear_compile.errors import SpearError
    mixed = _failed_capture_first(5, SpearError("allocated kernel workspace during its CUDA-graph capture"),
                                  "allocated kernel workspace")
    assert not mixed.has_room(rows=2) and len(mixed.graphs) == 1
