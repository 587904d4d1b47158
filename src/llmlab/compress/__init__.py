"""Compression of a built model: post-training quantization (``quantize``, ``gptq``, ``llm_int8``,
``smoothquant``, ``zeroquant``), with calibration data from ``calibrate``."""
