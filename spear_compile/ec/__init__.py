"""Error compensators: the ``CompensatedLinear`` module, the diagnostic, placement, SVD init, training,
the ``calibrate`` pipeline and EC I/O."""
