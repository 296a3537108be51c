"""Graph normalisation: passes that rewrite exported graphs so that onnxruntime runs them at any batch
size and onnx2torch converts them faithfully."""
from .passes import BATCH_PASSES, PASSES, PassContext, normalise, register

__all__ = ["BATCH_PASSES", "PASSES", "PassContext", "normalise", "register"]
