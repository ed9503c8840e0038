"""The converter: Hugging Face or mlx-lm checkpoints -> flashmoe checkpoints (`python -m flashmoe_mlx.convert`)."""

from .calibration import CalibrationError, CalibrationText
from .pipeline import ConvertError, convert
from .quantization import Precision, QuantizationError

__all__ = ["convert", "CalibrationError", "CalibrationText", "ConvertError", "Precision", "QuantizationError"]
