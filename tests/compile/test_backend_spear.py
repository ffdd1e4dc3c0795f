"""The ``spear`` backend: mode/options as torch.compile passes them, pass composition, uuid."""
import pytest
import torch
import torch.nn as nn

import spear_compile.compile.backend as backend
from spear_compile import SpearError
from spear_compile.compile import records
from spear_compile.quant.config import QuantConfig
from spear_compile.compile.pass_manager import SpearPassManager
from spear_compile.quant.api import quantize_linear_

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("fresh_compile")


def qlinear(k=32, n=16, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    return quantize_linear_(lin, QuantConfig.from_spec("w4-pc-rtn"))


def test_mode_maps_like_inductor():
    p = backend.config_patches("reduce-overhead")
    assert p["triton.cudagraphs"] is True and isinstance(p[backend.SLOT], SpearPassManager)
    p = backend.config_patches("max-autotune")
    assert p["max_autotune"] is True
    assert "triton.cudagraphs" not in backend.config_patches(None)
    assert backend.config_patches(None)["shape_padding"] is False
    assert backend.config_patches(None, {"shape_padding": True})["shape_padding"] is True


def test_bad_mode_and_option_raise():
    with pytest.raises(SpearError, match="unknown mode 'fast'"):
        backend.config_patches("fast")
    with pytest.raises(SpearError, match="not_an_option"):
        backend.config_patches(None, {"not_an_option": 1})


def test_uuid_stable_and_composed():
    a, b = SpearPassManager(), SpearPassManager()
    assert a.uuid() == b.uuid() and a.uuid() is not None
    assert SpearPassManager(user_pass=lambda g: None).uuid() is None  # unknown user pass: bypass the cache
    inner = SpearPassManager()
    composed = SpearPassManager(user_pass=inner)
    assert composed.uuid() == (a.uuid(), inner.uuid())


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead"])
def test_torch_compile_with_mode(mode):
    lin = qlinear()
    x = torch.randn(3, 32)
    with torch.no_grad():
        out = torch.compile(lin, backend="spear", mode=mode)(x)
        ref = lin(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [r.kind for r in records.active().matches] == ["plain"]


def test_user_post_pass_in_options_and_global_config_composed():
    seen = []
    lin = qlinear(seed=1)
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.compile(lin, backend="spear", options={"post_grad_custom_pre_pass": lambda g: seen.append("opt")})(x)
    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_pre_pass=lambda g: seen.append("global")), torch.no_grad():
        torch.compile(lin, backend="spear")(x)
    assert seen == ["opt", "global"]
    assert [r.matched for r in records.active().matches] == [True, True]


def test_no_recompile_across_calls_of_same_shape():
    lin = qlinear(seed=2)
    f = torch.compile(lin, backend="spear")
    with torch.no_grad():
        f(torch.randn(4, 32))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                y = f(torch.randn(4, 32))
    assert y.shape == (4, 16) and records.active().graphs >= 1
    assert len(records.active().matches) == 1
