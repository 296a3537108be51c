"""The models onnx-explainer knows by name (installed as ``explainer.zoo``): the embedded default
EfficientNet-Lite0 built from real ImageNet weights, the ONNX Model Zoo GoogLeNet (downloaded with a
checksum), and the nine zoo architectures shipped in the onnx wheel with seeded weights."""
