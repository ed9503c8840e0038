"""flashmoe-mlx: run Mixture-of-Experts models larger than memory on MLX by streaming routed experts.

The API mirrors mlx-lm's: `load` (with a memory budget), `generate` and `stream_generate`."""

__version__ = "0.1.0"

from .generation import generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "__version__"]
