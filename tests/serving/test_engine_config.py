"""``EngineConfig`` refuses bad values with a message naming the field, before any model is touched."""
import pytest
import torch

from spear_compile import SpearError
from spear_compile.serving import EngineConfig


@pytest.mark.parametrize("kw,match", [
    (dict(max_num_seqs=0), "max_num_seqs=0 must be an integer >= 1"),
    (dict(max_num_seqs=True), "max_num_seqs=True"),
    (dict(num_blocks=1), "num_blocks=1 must be an integer >= 2"),
    (dict(max_num_seqs=64, max_num_tokens=32), "max_num_tokens=32 must be >= max_num_seqs=64"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization=1.5"),
    (dict(ttft_slo_ms=-1), "ttft_slo_ms=-1"),
    (dict(dtype=torch.int8), "dtype=torch.int8"),
    (dict(decode_buckets=(1, 2)), "decode_buckets=\\(1, 2\\) must end at max_num_seqs=64"),
    (dict(ec_switch="yes"), "ec_switch='yes' must be True, False or None"),
    (dict(policy="slo", ec_switch=False), "policy='slo' needs ec_switch=True"),
    (dict(decode_attention="flash"), "decode_attention='flash' must be 'torch' or 'triton'"),
    (dict(freeze_gc=1), "freeze_gc=1 must be True, False or None"),
    (dict(compile_regions="yes"), "compile_regions='yes' must be True or False"),
    (dict(mixed_capture_first=1), "mixed_capture_first=1 must be True or False"),
    (dict(mixed_shape_cache="on"), "mixed_shape_cache='on' must be True or False"),
    (dict(mixed_graph_padding=0.5), "mixed_graph_padding=0.5 must be 0 \\(off\\) or a number in \\[1, 64\\]"),
    (dict(mixed_graph_padding=True), "mixed_graph_padding=True"),
    (dict(mixed_graph_padding="2"), "mixed_graph_padding='2'"),
    (dict(mixed_graph_bucket_padding=0), "mixed_graph_bucket_padding=0 must be a number in \\[1, 64\\]"),
    (dict(mixed_graph_bucket_padding=True), "mixed_graph_bucket_padding=True"),
])
def test_bad_values_name_the_field(kw, match):
    with pytest.raises(SpearError, match=match):
        EngineConfig(**kw)


def test_ec_switch_defaults_follow_the_policy():
    assert EngineConfig().ec_switch is False              # ECs on only: half the start-up work
    assert EngineConfig(policy="slo").ec_switch is True    # the EC-aware cost model profiles both states
    assert EngineConfig(policy="slo-ec-blind").ec_switch is True
    assert EngineConfig(ec_switch=True).ec_switch is True


def test_freeze_gc_moves_start_up_objects_out_of_the_collectors_reach():
    """``freeze_gc``: the engine collects once after start-up and freezes the survivors (gc.freeze), so no full
    collection walks them mid-step; off by default off CUDA (tests build many engines)."""
    import gc
    from .conftest import make_engine, toy_model
    assert make_engine(toy_model()).gc_frozen is None     # CPU default: off
    gc.unfreeze()
    try:
        eng = make_engine(toy_model(), freeze_gc=True)
        assert eng.gc_frozen["frozen"] > 0 and gc.get_freeze_count() > 0   # frozen objects still die by refcount
        assert eng.gc_frozen["collect_s"] >= 0.0
        assert eng.generate([[5, 6, 7]], None)[0].num_output_tokens > 0   # still serves
    finally:
        gc.unfreeze()
