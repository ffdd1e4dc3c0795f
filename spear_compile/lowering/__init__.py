"""Host side of the kernels (the Triton code is in ``kernels``): the ops ``spear::fused_linear`` /
``spear::grouped_linear`` / ``spear::grouped_linear_ec`` and the phase-aware dispatch that picks and launches a
kernel config for each call (``dispatch``; configs, candidates, tuner, workspaces, runners)."""
from .fused_linear import fused_linear, reference_fused_linear  # noqa: F401  (registers spear::fused_linear)
