"""What the model is: loading (bytes → a checked ModelProto), the input/output contract, preprocessing,
class names, feature-map layouts and the graph's structure. Nothing here runs the model: that is
``explainer.runtime``."""
from .load import LoadedModel, load_model
from .preprocess import PRESETS, Preprocessing

__all__ = ["LoadedModel", "load_model", "PRESETS", "Preprocessing"]
