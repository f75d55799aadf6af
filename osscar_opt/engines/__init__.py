"""Engines that run an exported model: llama.cpp (GGUF), ONNX Runtime (ONNX), and eager torch for comparison.

One module per engine (:mod:`~osscar_opt.engines.llama_cpp`, :mod:`~osscar_opt.engines.onnx_runtime`,
:mod:`~osscar_opt.engines.torch_speed`); :mod:`~osscar_opt.engines.timing` holds the median-and-range
summary they share. Each engine's package is imported only when it is used.
"""

ENGINES = ("torch", "llama.cpp", "onnxruntime")
