"""Flax NNX models (a CNN, a ViT, a scanned RNN) exported with jax2onnx (``jax2onnx.to_onnx``, its
default opset). Runs in the jax venv (build.py).

    python tests/frameworks/export_jax.py FOLDER      (FOLDER/job.json, FOLDER/pixels.npy)

The CNN is NHWC, as JAX is: ``padding="SAME"`` convolutions, one of stride 2 (on an even size SAME
pads one pixel after and none before: asymmetric), BatchNorm, a SAME max pool and a SAME average pool
(3 x 3, stride 2: asymmetric too), global average pooling and a Dense head (logits).
"""
from __future__ import annotations

import time

import numpy as np

import common

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_cnn(rngs, classes: int = 10):
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 16, (3, 3), padding="SAME", rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, rngs=rngs)
            self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, rngs=rngs)
            self.conv3 = nnx.Conv(32, 64, (3, 3), padding="SAME", rngs=rngs)
            self.head = nnx.Linear(64, classes, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
            x = nnx.relu(self.bn2(self.conv2(x)))
            x = nnx.avg_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
            x = nnx.relu(self.conv3(x))
            return self.head(x.mean(axis=(1, 2)))

    return CNN(rngs)


def make_vit(rngs, size, classes: int = 10, patch: int = 4, dim: int = 64, heads: int = 4):
    """A small ViT: patch Conv, class token, position table, 2 pre-norm blocks (LayerNorm,
    MultiHeadAttention, GELU MLP), the class token's LayerNorm and a Dense head."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
            self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
            self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
            self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))

    class ViT(nnx.Module):
        def __init__(self, rngs):
            tokens = (size[0] // patch) * (size[1] // patch)
            self.embed = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs)
            self.cls = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens + 1, dim)))
            self.block0, self.block1 = Block(rngs), Block(rngs)
            self.norm = nnx.LayerNorm(dim, rngs=rngs)
            self.head = nnx.Linear(dim, classes, rngs=rngs)

        def __call__(self, x):
            x = self.embed(x)
            x = x.reshape(x.shape[0], -1, dim)
            cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, dim))
            x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
            x = self.block1(self.block0(x))
            return self.head(self.norm(x[:, 0]))

    return ViT(rngs)


def make_scan_rnn(rngs, classes: int = 10, hidden: int = 12):
    """Sequencer's idea in JAX: a 4x4 patch Conv, then each row of the feature map a sequence through a
    GRU cell stepped by ``jax.lax.scan`` (jax2onnx writes a Loop), the states' mean and a Linear head."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class ScanRNN(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Conv(3, 16, (4, 4), strides=(4, 4), padding="VALID", rngs=rngs)
            self.wx = nnx.Param(0.3 * jax.random.normal(rngs.params(), (16, 3 * hidden)))
            self.wh = nnx.Param(0.3 * jax.random.normal(rngs.params(), (hidden, 3 * hidden)))
            self.b = nnx.Param(0.1 * jax.random.normal(rngs.params(), (3 * hidden,)))
            self.head = nnx.Linear(hidden, classes, rngs=rngs)

        def __call__(self, x):
            f = self.embed(x)
            b, h, w, c = f.shape
            seq = jnp.transpose(f.reshape(b * h, w, c), (1, 0, 2))  # (time = columns, rows, features)
            wx, wh, bias = self.wx[...], self.wh[...], self.b[...]

            def step(state, xt):
                i_r, i_z, i_n = jnp.split(xt @ wx + bias, 3, axis=-1)
                h_r, h_z, h_n = jnp.split(state @ wh, 3, axis=-1)
                reset, update = jax.nn.sigmoid(i_r + h_r), jax.nn.sigmoid(i_z + h_z)
                new = (1 - update) * jnp.tanh(i_n + reset * h_n) + update * state
                return new, new

            _, states = jax.lax.scan(step, jnp.zeros((b * h, hidden), seq.dtype), seq)
            return self.head(jnp.transpose(states, (1, 0, 2)).reshape(b, h, w, hidden).mean(axis=(1, 2)))

    return ScanRNN(rngs)


def main() -> None:
    from importlib.metadata import version

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax2onnx import to_onnx

    started = time.time()
    folder, case, pixels = common.job()

    def preprocess(batch):  # as JAX code writes it: ImageNet normalisation, or [-1, 1] for the ViT
        if case["preprocessing"] == "tf":
            return jnp.asarray(batch, jnp.float32) / 127.5 - 1.0
        return (jnp.asarray(batch, jnp.float32) / 255.0 - jnp.asarray(MEAN)) / jnp.asarray(STD)

    x = preprocess(pixels)
    common.check_preprocessing(np.asarray(x), pixels, case["preprocessing"], case["layout"])
    rngs = nnx.Rngs(common.SEED)
    model = {"cnn": lambda: make_cnn(rngs), "vit": lambda: make_vit(rngs, case["input_size"]),
             "scanrnn": lambda: make_scan_rnn(rngs)}[case["model"]]()
    norms = [m for _, m in model.iter_modules() if isinstance(m, nnx.BatchNorm)]
    for norm in norms:  # BatchNorm statistics set from a batch: one training-mode pass, momentum 0
        norm.momentum = 0.0
    if norms:
        model.train()
        model(preprocess(common.calibration_pixels(pixels)))
    model.eval()
    scale = common.head_scale(np.asarray(model(x)))
    model.head.kernel.value = model.head.kernel.value * scale
    model.head.bias.value = model.head.bias.value * scale
    probs = common.softmax(np.asarray(model(x)))
    path = folder / "model.onnx"
    kwargs = {"opset": case["opset"]} if case["opset"] else {}
    proto = to_onnx(model, [("B", *case["input_size"], 3)], input_names=["image"], output_names=["logits"],
                    **kwargs)
    import onnx

    onnx.save(proto, str(path))
    what = {"cnn": "flax.nnx CNN: SAME convs (one of stride 2), BatchNorm, SAME 3x3/2 max and average pools, "
                   "global mean, Linear",
            "vit": "flax.nnx ViT: 4x4 patch Conv, class token, 2 blocks of LayerNorm + MultiHeadAttention + GELU "
                   "MLP, Linear",
            "scanrnn": "flax.nnx: 4x4 patch Conv, rows through a GRU cell by jax.lax.scan (a Loop), mean, "
                       "Linear"}[case["model"]]
    notes = what + "; jax2onnx.to_onnx with a symbolic batch 'B'" + ("" if case["opset"] else " at its default opset")
    common.finish(folder, case, pixels, probs, framework_version=f"jax {jax.__version__}, flax {version('flax')}",
                  exporter_version=f"jax2onnx {version('jax2onnx')}", outputs="logits", notes=notes,
                  started=started)


if __name__ == "__main__":
    main()
