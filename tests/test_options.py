"""``spear_compile.options``: every environment variable read in one place, lazily; a malformed value is refused
where it is used, naming the variable and its expected form, never at import."""
import os
import subprocess
import sys

import pytest

from spear_compile import SpearError, options


def test_defaults(monkeypatch):
    for name in ("SPEAR_AUTOTUNE", "SPEAR_GROUP_LINEARS", "SPEAR_DECOMPOSE_PREFILL", "SPEAR_EC_MERGE", "SPEAR_EC_PAD_X",
                 "SPEAR_XPASS_IN_PLACE", "SPEAR_TUNE_CACHE", "SPEAR_BATCHED_KERNEL", "SPEAR_GLUON_KERNEL",
                 "SPEAR_GLUON_SWAP", "SPEAR_GROUP_EC_LINEARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    o = options.current()
    assert (o.autotune, o.group_linears, o.decompose_prefill, o.ec_merge, o.ec_pad_x) == (True, True, True, True, "auto")
    assert o.batched_kernel is True and o.gluon_kernel is True and o.gluon_swap is True and o.group_ec_linears is True
    assert o.xpass_in_place == options.XPASS_IN_PLACE_DEFAULT == (64, 128, 3, 4, 1)
    assert o.tune_cache_dir == os.path.join("/x", "spear_compile")


@pytest.mark.parametrize("name,field", [("SPEAR_AUTOTUNE", "autotune"), ("SPEAR_GROUP_LINEARS", "group_linears"),
                                        ("SPEAR_GROUP_EC_LINEARS", "group_ec_linears"),
                                        ("SPEAR_DECOMPOSE_PREFILL", "decompose_prefill"), ("SPEAR_EC_MERGE", "ec_merge"),
                                        ("SPEAR_BATCHED_KERNEL", "batched_kernel"),
                                        ("SPEAR_GLUON_KERNEL", "gluon_kernel"), ("SPEAR_GLUON_SWAP", "gluon_swap")])
def test_switches_follow_the_environment_at_each_call(monkeypatch, name, field):
    monkeypatch.setenv(name, "0")
    assert getattr(options.current(), field) is False
    monkeypatch.setenv(name, "1")
    assert getattr(options.current(), field) is True
    monkeypatch.setenv(name, "yes")
    with pytest.raises(SpearError, match=f"{name}='yes': expected 0 or 1"):
        options.current()


@pytest.mark.parametrize("value", ["64,128,3", "a,b,c,d,e", "64,128,3,4,0"])
def test_malformed_xpass_is_refused_at_use(monkeypatch, value):
    monkeypatch.setenv("SPEAR_XPASS_IN_PLACE", value)
    with pytest.raises(SpearError, match="SPEAR_XPASS_IN_PLACE=.*BLOCK_M,BLOCK_K,stages,warps,programs_per_SM"):
        options.current()


def test_pad_x_and_tune_cache(monkeypatch):
    monkeypatch.setenv("SPEAR_EC_PAD_X", "1")
    assert options.current().ec_pad_x == "1"
    monkeypatch.setenv("SPEAR_EC_PAD_X", "always")
    with pytest.raises(SpearError, match="SPEAR_EC_PAD_X='always': expected auto, 0 or 1"):
        options.current()
    monkeypatch.setenv("SPEAR_EC_PAD_X", "auto")
    for off in ("0", ""):
        monkeypatch.setenv("SPEAR_TUNE_CACHE", off)
        assert options.current().tune_cache_dir is None
    monkeypatch.setenv("SPEAR_TUNE_CACHE", "/some/dir")
    assert options.current().tune_cache_dir == "/some/dir"


def test_import_never_reads_a_malformed_variable():
    env = dict(os.environ, SPEAR_XPASS_IN_PLACE="bad", SPEAR_GROUP_LINEARS="maybe", SPEAR_EC_PAD_X="x")
    res = subprocess.run([sys.executable, "-c", "import spear_compile, spear_compile.lowering.dispatch, "
                          "spear_compile.compile.pass_manager"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_no_other_module_reads_the_environment():
    """``os.environ`` / ``getenv`` appear in ``options.py`` only (the package's one reader)."""
    import spear_compile
    root = os.path.dirname(spear_compile.__file__)
    readers = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py") and f != "options.py":
                text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                if "os.environ" in text or "getenv(" in text:
                    readers.append(os.path.relpath(os.path.join(dirpath, f), root))
    assert readers == [], readers


def test_tune_compile_threads(monkeypatch):
    monkeypatch.delenv("SPEAR_TUNE_COMPILE_THREADS", raising=False)
    assert options.current().tune_compile_threads == min(16, os.cpu_count() or 1)
    monkeypatch.setenv("SPEAR_TUNE_COMPILE_THREADS", "3")
    assert options.current().tune_compile_threads == 3
    for bad in ("0", "many"):
        monkeypatch.setenv("SPEAR_TUNE_COMPILE_THREADS", bad)
        with pytest.raises(SpearError, match=f"SPEAR_TUNE_COMPILE_THREADS='{bad}': expected an integer >= 1"):
            options.current()
