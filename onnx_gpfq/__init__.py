"""onnx-gpfq: post-training quantization of ONNX models with GPFQ (greedy path-following quantization).

Python API::

    import onnx_gpfq
    model, report = onnx_gpfq.quantize("model.onnx", "calib.npz", weight_bits=4)
    onnx_gpfq.save_model(model, "model.w4a8.onnx")
    metrics = onnx_gpfq.evaluate("model.onnx", ["model.w4a8.onnx"], "test.npz")
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .graph import save_model  # noqa: E402
from .options import Options  # noqa: E402
from .quantize import Report, quantize  # noqa: E402

__all__ = ["Options", "Report", "UserError", "evaluate", "quantize", "save_model", "__version__"]
