"""The nine ONNX Model Zoo architectures that ship inside the onnx wheel
(``onnx/backend/test/data/light/light_*.onnx``), made runnable: their weights were replaced by
ConstantOfShape nodes filled with one value, which we swap for seeded random tensors scaled by fan-in
(He initialisation), so activations neither vanish nor explode and maps are not degenerate."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import producers

ARCHITECTURES = {
    "alexnet": "light_bvlc_alexnet",
    "densenet121": "light_densenet121",
    "inception_v1": "light_inception_v1",  # BVLC GoogLeNet
    "inception_v2": "light_inception_v2",
    "resnet50": "light_resnet50",
    "shufflenet": "light_shufflenet",
    "squeezenet": "light_squeezenet",
    "vgg19": "light_vgg19",
    "zfnet512": "light_zfnet512",
}


def light_model_path(arch: str) -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"{ARCHITECTURES[arch]}.onnx"


def _weight(rng, shape, role: str, fill: float) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    if role == "weight" and len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    if role == "variance":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if role == "scale":
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if role == "bias":
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return np.full(shape, fill, np.float32) * rng.uniform(0.9, 1.1, shape).astype(np.float32)


def _roles(graph: onnx.GraphProto) -> dict[str, str]:
    """How each weight is used, following Reshape/Unsqueeze to the consuming op."""
    roles: dict[str, str] = {}
    users: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            users.setdefault(name, []).append((node, k))

    def role_of(name: str, depth: int = 0) -> str:
        for node, k in users.get(name, []):
            if node.op_type in ("Reshape", "Unsqueeze", "Transpose") and depth < 3 and k == 0:
                return role_of(node.output[0], depth + 1)
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                return "weight" if k == 1 else "bias"
            if node.op_type == "BatchNormalization":
                return {1: "scale", 2: "bias", 3: "bias", 4: "variance"}.get(k, "other")
            if node.op_type == "Mul":
                return "scale"
            if node.op_type in ("Add", "Sum"):
                return "bias"
        return "other"

    for node in graph.node:
        if node.op_type == "ConstantOfShape":
            roles[node.output[0]] = role_of(node.output[0])
    return roles


def seeded_model(arch: str, seed: int | None = None) -> onnx.ModelProto:
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    model = onnx.load(str(light_model_path(arch)))
    g = model.graph
    rng = np.random.default_rng(zlib.crc32(arch.encode()) if seed is None else seed)
    inits = {t.name: t for t in g.initializer}
    roles = _roles(g)
    keep = []
    for node in g.node:
        if node.op_type != "ConstantOfShape":
            keep.append(node)
            continue
        shape = numpy_helper.to_array(inits[node.input[0]])
        fill = float(numpy_helper.to_array(onnx.helper.get_attribute_value(node.attribute[0])).ravel()[0])
        value = _weight(rng, shape, roles[node.output[0]], fill)
        t = g.initializer.add()  # filled in place: appending a made tensor would copy it (VGG19: 411 MB)
        t.name, t.data_type = node.output[0], onnx.TensorProto.FLOAT
        t.dims.extend(value.shape)
        t.raw_data = value.tobytes()
        if model.ir_version < 4:  # IR 3 requires every initializer to be declared as a graph input
            g.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, value.shape))
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    unused = [t for t in g.initializer if t.name not in used]
    for t in unused:
        g.initializer.remove(t)
    # Old IR: weights listed as graph inputs too; keep that list consistent with the initializers.
    names = {t.name for t in g.initializer}
    for vi in [i for i in g.input if i.name.endswith("__SHAPE") and i.name not in names]:
        g.input.remove(vi)
    inits = {t.name for t in g.initializer}
    for vi in [i for i in g.input if i.name not in used and i.name not in inits]:
        g.input.remove(vi)  # Caffe2's unused queue inputs
    _calibrate(model)
    model.graph.doc_string = f"{ARCHITECTURES[arch]} from the onnx wheel with seeded weights"
    onnx.checker.check_model(model)
    return model


def _calibrate(model: onnx.ModelProto, target_std: float = 3.0) -> None:
    """Rescale the last weighted layer so the logits have a spread of ``target_std`` on a random
    caffe-range image: the softmax is then neither flat nor saturated, so gradients and occlusion maps
    carry signal. ReLU and pooling between that layer and the logits are positively homogeneous."""
    import onnxruntime as ort

    g = model.graph
    producer = producers(g)
    softmax = [n for n in g.node if n.op_type == "Softmax"]
    logits = softmax[-1].input[0] if softmax else g.output[0].name
    node = producer[logits]
    while node.op_type not in ("Gemm", "Conv", "MatMul"):
        node = producer[node.input[0]]
    read_logits = logits != g.output[0].name  # add them as an output for this one run (no copy: VGG is 575 MB)
    if read_logits:
        g.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    if read_logits:
        del g.output[-1]
    feed = session.get_inputs()[0]
    x = np.random.default_rng(0).uniform(-120, 130, (1, 3, 224, 224)).astype(np.float32)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {feed.name: x})))
    factor = target_std / max(float(np.std(values[logits])), 1e-12)
    inits = {t.name: t for t in g.initializer}
    for name in node.input[1:3]:
        source = name
        while source not in inits:  # weights reached through a Reshape (GoogLeNet's classifier)
            source = producer[source].input[0]
        t = inits[source]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
