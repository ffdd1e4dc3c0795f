"""Weight-only quantization: the config, the ``QuantizedWeight`` tensor subclass and its packing, RTN and GPTQ,
the ``spear::qlinear`` op, the ``quantize`` API and quantized-model I/O."""
