"""Running the model: the ``Classifier`` (a described model with its engines), onnxruntime streams
(``ort_engine``), the converted torch module (``torch_engine``), the perturbation canvas and forward
functions every black-box method shares (``perturb``), incremental inference (``incremental``) and the
memory guard of a run (``budget``)."""
from .classifier import Classifier, Layer, Prediction, load

__all__ = ["Classifier", "Layer", "Prediction", "load"]
