"""Static-shape inference engine: capacity-padded tensors, kernel maps built on the device, no host syncs,
CUDA-graph capturable. The eager spconv path (``cmfiou_core.model``) stays the reference and the training path."""
from .padded import PaddedSparse

__all__ = ["PaddedSparse"]
