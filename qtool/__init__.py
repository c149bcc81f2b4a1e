"""qtool: post-training quantization of ONNX models, checked side by side on onnxruntime.

The API functions are imported lazily so that ``qtool --help`` stays instant.
"""

__version__ = "0.1.0"

__all__ = ["inspect", "calibrate", "plan", "quantize", "evaluate", "__version__"]


def __getattr__(name):
    if name in ("inspect", "calibrate", "plan", "quantize", "evaluate"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'qtool' has no attribute {name!r}")
