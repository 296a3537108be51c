"""TensorFlow / Keras 3 classifiers exported with tf2onnx (``tf2onnx.convert.from_keras``) or with
Keras 3's own ``model.export(path, format="onnx")``. Runs in the tf venv (build.py).

    python tests/frameworks/export_tf.py FOLDER      (FOLDER/job.json, FOLDER/pixels.npy)

Models: Keras applications (``weights=None``, their shipped classifier with its softmax), a small
ViT-style model (patch Conv2D, class token, LayerNormalization, MultiHeadAttention, MLP; its own
Rescaling to [-1, 1] in the graph; logits out), a grayscale Sequential CNN (softmax out) and recurrent
models over the rows of a feature map (bidirectional LSTM or GRU, Sequencer's idea).
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import common  # noqa: E402

APPS = {  # name -> (keras.applications module, the case's preprocessing as keras does it)
    "MobileNetV2": "mobilenet_v2",
    "EfficientNetB0": "efficientnet",
    "EfficientNetV2B0": "efficientnet_v2",
    "ResNet50": "resnet50",
    "DenseNet121": "densenet",  # mode "torch": ImageNet mean and std on x/255
    "NASNetMobile": "nasnet",
    # the sweep subset
    "ConvNeXtTiny": "convnext",  # Normalization in the graph (preprocess_input does nothing)
    "Xception": "xception",
    "InceptionV3": "inception_v3",
    "MobileNetV3Small": "mobilenet_v3",  # Rescaling in the graph; classifier: a 1x1 Conv2D, Flatten, softmax
    "ResNet50V2": "resnet_v2",
    "EfficientNetV2B1": "efficientnet_v2",
    "MobileNetV3Large": "mobilenet_v3",
    "InceptionResNetV2": "inception_resnet_v2",
    "MobileNet": "mobilenet",
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def vit(size, classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4, patch: int = 8):
    import keras
    from keras import layers

    class ClassToken(layers.Layer):
        def build(self, input_shape):
            self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal", name="cls")

        def call(self, x):
            token = keras.ops.broadcast_to(self.token, (keras.ops.shape(x)[0], 1, x.shape[-1]))
            return keras.ops.concatenate([token, x], axis=1)

    class Position(layers.Layer):
        def build(self, input_shape):
            self.table = self.add_weight(shape=(1, *input_shape[1:]), initializer="random_normal", name="pos")

        def call(self, x):
            return x + self.table

    def gelu_tanh(t):  # tf2onnx 1.17 writes Keras 3's exact gelu as an Erfc node: no such ONNX op
        return keras.activations.gelu(t, approximate=True)

    inputs = keras.Input((*size, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = layers.Conv2D(dim, patch, strides=patch, name="patch_embed")(x)
    x = layers.Reshape(((size[0] // patch) * (size[1] // patch), dim))(x)
    x = Position()(ClassToken()(x))
    for i in range(depth):
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(x)
        y = layers.MultiHeadAttention(num_heads=heads, key_dim=dim // heads, name=f"block{i}_attn")(y, y)
        x = layers.Add()([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(x)
        y = layers.Dense(2 * dim, activation=gelu_tanh, name=f"block{i}_fc1")(y)
        y = layers.Dense(dim, name=f"block{i}_fc2")(y)
        x = layers.Add()([x, y])
    x = layers.LayerNormalization(epsilon=1e-6, name="norm")(x)
    x = layers.Lambda(lambda t: t[:, 0], output_shape=(dim,), name="cls_out")(x)
    return keras.Model(inputs, layers.Dense(classes, name="head")(x), name="vit")


def gray_cnn(size, classes: int = 10):
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((*size, 1), name="image"),
        layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3), layers.ReLU(),
        layers.GlobalAveragePooling2D(),
        layers.Dense(classes, activation="softmax", name="head"),
    ], name="gray_cnn")


def row_rnn(size, kind: str, classes: int = 10, units: int = 12, reset_after: bool = True):
    """Sequencer's idea in Keras: a patch Conv2D, then every row of the feature map a sequence through a
    bidirectional recurrent layer (``TimeDistributed`` over the rows), then a Dense mixer, pooling and
    the head; its own Rescaling to [-1, 1]; logits out. ``kind``: "LSTM" or "GRU" (``reset_after``:
    Keras's default True, the reset gate after the recurrent product; False, before it)."""
    import keras
    from keras import layers

    extra = {"reset_after": reset_after} if kind == "GRU" else {}
    recurrent = getattr(layers, kind)(units, return_sequences=True, **extra)
    inputs = keras.Input((*size, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = layers.Conv2D(16, 4, strides=4, name="patch_embed")(x)
    x = layers.TimeDistributed(layers.Bidirectional(recurrent), name="rows")(x)
    x = layers.Dense(16, activation="relu", name="mix")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes, name="head")(x), name=f"row_{kind.lower()}")


def build(case: dict):
    """(model, preprocess: uint8 pixels -> the model's input as the framework does it)."""
    import keras

    size = tuple(case["input_size"])
    if case["model"] in APPS:
        module = getattr(keras.applications, APPS[case["model"]])
        model = getattr(keras.applications, case["model"])(weights=None, input_shape=(*size, 3), classes=1000)
        if case["model"] == "EfficientNetB0":
            # weights="imagenet" would load the Normalization layer's statistics: the ImageNet ones
            norm = next(l for l in model.layers if isinstance(l, keras.layers.Normalization))
            norm.adapt_mean.assign(np.float32(IMAGENET_MEAN))
            norm.adapt_variance.assign(np.float32(IMAGENET_STD) ** 2)
            norm.finalize_state()
        return model, lambda p: np.asarray(module.preprocess_input(p.astype(np.float32)), np.float32)
    if case["model"] == "vit":
        return vit(size), lambda p: p.astype(np.float32)
    if case["model"] == "graycnn":
        return gray_cnn(size), lambda p: p.astype(np.float32) / np.float32(255)
    if case["model"] in ("rowlstm", "rowgru", "rowgru-reset-before"):
        kind = "LSTM" if case["model"] == "rowlstm" else "GRU"
        return row_rnn(size, kind, reset_after=case["model"] != "rowgru-reset-before"), lambda p: p.astype(np.float32)
    raise KeyError(case["model"])


def calibrate(model, x) -> None:
    """BatchNorm moving statistics set to those of the batch ``x`` (one training-mode pass with
    momentum 0 and dropout off), so that inference is neither flat nor saturated."""
    import keras

    norms = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    if not norms:
        return
    drops = [l for l in model._flatten_layers() if isinstance(l, keras.layers.Dropout)]
    saved = [(l, l.momentum) for l in norms], [(l, l.rate) for l in drops]
    for layer in norms:
        layer.momentum = 0.0
    for layer in drops:
        layer.rate = 0.0
    model(x, training=True)
    for layer, momentum in saved[0]:
        layer.momentum = momentum
    for layer, rate in saved[1]:
        layer.rate = rate


def rescale_head(model, x) -> str:
    """The last Dense layer rescaled so that the logits on ``x`` have a standard deviation of 3;
    returns what the model outputs ("probabilities" when that Dense ends in softmax)."""
    import keras

    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):  # MobileNet: 1x1 Conv2D (V3 "logits", V1 "conv_preds"), ..., softmax
        head = next(l for l in model.layers if l.name in ("logits", "conv_preds"))
        assert isinstance(head, keras.layers.Conv2D) and model.layers[-1].activation is keras.activations.softmax
    features = keras.Model(model.inputs, head.input)
    kernel, bias = head.get_weights()
    inputs = np.asarray(features(x, training=False))
    logits = inputs.reshape(len(x), -1) @ kernel.reshape(-1, kernel.shape[-1]) + bias
    scale = common.head_scale(logits)
    head.set_weights([kernel * scale, bias * scale])
    last = model.layers[-1]
    return "probabilities" if getattr(last, "activation", None) is keras.activations.softmax else "logits"


def main() -> None:
    import keras
    import tensorflow as tf
    import tf2onnx

    started = time.time()
    folder, case, pixels = common.job()
    keras.utils.set_random_seed(common.SEED)
    model, preprocess = build(case)
    x = preprocess(pixels)
    common.check_preprocessing(x, pixels, case["preprocessing"], "NHWC")
    calibrate(model, preprocess(common.calibration_pixels(pixels)))
    outputs = rescale_head(model, x)
    raw = np.asarray(model(x, training=False), dtype=np.float32)
    probs = raw if outputs == "probabilities" else common.softmax(raw)
    path = folder / "model.onnx"
    if case["exporter"] == "tf2onnx":
        spec = (tf.TensorSpec((None, *x.shape[1:]), tf.float32, name="input"),)
        if isinstance(model, keras.Sequential):
            # from_keras fails on Keras 3 Sequential models (tf2onnx 1.17: KeyError 'keras_tensor_N'
            # looking up the output names): the documented alternative, from_function on a tf.function
            function = tf.function(lambda image: model(image, training=False))
            tf2onnx.convert.from_function(function, input_signature=spec, opset=case["opset"],
                                          output_path=str(path))
            how = f"tf2onnx.convert.from_function(opset={case['opset']}) (from_keras fails on Sequential)"
        else:
            nchw = ["input"] if case.get("inputs_as_nchw") else None
            tf2onnx.convert.from_keras(model, input_signature=spec, opset=case["opset"], output_path=str(path),
                                       inputs_as_nchw=nchw)
            how = f"tf2onnx.convert.from_keras(opset={case['opset']}" + (", inputs_as_nchw)" if nchw else ")")
        how += ", dynamic batch"
    else:
        model.export(str(path), format="onnx", opset_version=case["opset"], verbose=False)
        how = f"model.export(format='onnx', opset_version={case['opset']})"
    notes = f"keras {case['model']} ({model.count_params() / 1e6:.1f} M parameters); {how}"
    common.finish(folder, case, pixels, probs, framework_version=f"tensorflow {tf.__version__}, keras "
                  f"{keras.__version__}", exporter_version=(f"tf2onnx {tf2onnx.__version__}" if case["exporter"] ==
                  "tf2onnx" else f"keras {keras.__version__} (tf2onnx {tf2onnx.__version__})"),
                  outputs=outputs, notes=notes, started=started)


if __name__ == "__main__":
    main()
