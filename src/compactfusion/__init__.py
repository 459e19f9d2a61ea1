"""compactfusion: fast multi-device diffusion-transformer inference on slow links.

Sends compressed step-to-step residuals of activations, with error feedback, instead of full activations
(CompactFusion: "Accelerating Parallel Diffusion Model Serving with Residual Compression", NeurIPS 2025).
"""
from .comm import LinkModel
from .residual import CompressionConfig
from .parallel import ParallelConfig
from .api import context, parallelize, reset, set_request_batches, stats, unparallelize

__version__ = "0.1.0"
__all__ = ["CompressionConfig", "ParallelConfig", "LinkModel", "parallelize", "unparallelize", "stats", "context",
           "reset", "set_request_batches", "__version__"]
