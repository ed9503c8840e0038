"""flashmoe-mlx: run Mixture-of-Experts models larger than memory on MLX by streaming routed experts."""

__version__ = "0.1.0"

from .loader import load  # noqa: E402

__all__ = ["load", "__version__"]
