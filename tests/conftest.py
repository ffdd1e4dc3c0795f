"""Test-session setup. Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
before anything imports triton: CPU CI runs every Triton kernel under the interpreter."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
