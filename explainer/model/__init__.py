"""Loading ONNX classifiers and running them: input contract, preprocessing, labels, onnxruntime."""
from .classifier import Classifier, Layer, Prediction
from .load import LoadedModel, load_model
from .preprocess import PRESETS, Preprocessing

__all__ = ["Classifier", "Layer", "Prediction", "LoadedModel", "load_model", "PRESETS", "Preprocessing"]
