"""Ahead-of-time sm_90 compiles for the tests: a script run in a subprocess without the interpreter (Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, and the test session has set it), its last stdout line parsed as
JSON. Needs no GPU, only Triton's bundled ``ptxas``; the test is skipped where this Triton has none."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_sm90_script(script: str):
    """``script``'s last printed line (JSON), the script run by this Python from the repository root."""
    if not (Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
