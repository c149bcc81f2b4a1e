"""qtool: post-training quantization of ONNX models, checked side by side on onnxruntime.

The API functions are imported lazily so that ``qtool --help`` stays instant.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# numpy's OpenBLAS starts one thread per core and busy-waits between them. qtool's numpy work is
# many small products (a layer's K x K input Hessian, GPTQ) between onnxruntime runs, whose own
# threads hold the cores: on a 2-core machine with one other busy process, EfficientNet-Lite0's
# statistics pass for --algorithms rounding took 66 s for 8 crops with OpenBLAS's 2 threads and
# 2.6 s with 1. So one BLAS thread unless the user chose otherwise (only before numpy is loaded:
# a program that loaded it first keeps its own setting).
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__all__ = ["inspect", "calibrate", "plan", "quantize", "evaluate", "__version__"]


def __getattr__(name):
    if name in ("inspect", "calibrate", "plan", "quantize", "evaluate"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
