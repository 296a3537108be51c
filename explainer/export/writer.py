"""``export_explained``: the source model, untouched, plus a side branch computing the explanation."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportWriteError, InvalidParameterError, LayerNotFeatureMapError, UnsupportedModelError
from ..graph import reads
from . import EXPORTERS, _register_builtin
from .context import ExportContext
from .head import Backward, Head, constant_values, early_head, measure
from .resize import resize_maps

MAP_SIZES = ("feature", "input")
SALIENCY, SALIENCY_CLASS, TARGET = "saliency", "saliency_class", "target"
TWO_GB = 2 ** 31


def export_explained(net, out, method: str = "gradcam", feature_layer=None, top_k: int = 1,
                     map_size: str = "feature", *, external_data: bool | None = None) -> Path:
    """Write ``net``'s model with its explanation as extra outputs; returns the written path.

    The written model keeps the source's inputs and outputs (bit-identical in onnxruntime) and adds
    ``saliency`` float32 (N, K, h, w) -- the maps of the top ``top_k`` classes by score, as the
    library's ``method`` computes them at the feature layer's resolution, or resized to the input
    (``map_size="input"``, the library's bicubic) -- and ``saliency_class`` int64 (N, K). With
    ``top_k=0`` the classes come from a new int64 input ``target`` (N,), and K = 1."""
    _register_builtin()
    where = "export_explained"
    if not isinstance(method, str) or method not in EXPORTERS:
        raise InvalidParameterError(
            f"{where}: method {method!r} cannot be exported as a graph; exportable methods: "
            f"{', '.join(sorted(EXPORTERS))}. Other methods run with the library (explainer.get_method).")
    if map_size not in MAP_SIZES:
        raise InvalidParameterError(f"{where}: map_size must be one of {MAP_SIZES}; got {map_size!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= int(top_k) <= net.num_classes:
        raise InvalidParameterError(f"{where}: top_k must be an integer in [0, {net.num_classes}] (0: the classes "
                                    f"come from an input 'target'); got {top_k!r}.")
    top_k = int(top_k)
    out = _check_destination(out, where)
    model = build_explained(net, method, feature_layer, top_k, map_size, where=where)
    return _write(model, out, external_data, where)


def build_explained(net, method: str, feature_layer, top_k: int, map_size: str, *, source=None,
                    targets_per_image: bool = False, diagnostics: bool = False,
                    where: str = "export_explained") -> onnx.ModelProto:
    """The explained model (see ``export_explained``; arguments validated there). ``source``: the graph
    to add the branch to (default: the model as loaded, ``net.source_model``; the library's own in-graph
    path passes ``net.model``, which runs any batch); ``targets_per_image``: the input ``target`` is
    (N, K), K classes per image, instead of (N,); ``diagnostics``: the builders' extra tensors
    (``ctx.diagnostics``) become outputs too, named ``saliency_<key>``."""
    _register_builtin()
    source = net.source_model if source is None else source
    feature, layer_name, layout = _feature_layer(net, feature_layer, where)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    graph = model.graph
    source_nodes, source_initializers = len(graph.node), len(graph.initializer)
    produced = {o for n in graph.node for o in n.output}
    if feature not in produced:
        raise UnsupportedModelError(f"{where}: the feature tensor {feature!r} is computed only by the library's "
                                    "normalised copy of the graph; pick another feature_layer.")
    scores = net.gradient_scores
    head = Head(graph, feature, scores)
    if not head.found:
        raise LayerNotFeatureMapError(f"{where}: the scores {scores!r} do not depend on layer {layer_name!r}; "
                                      "pick a layer before the classifier's head (net.layers() lists them).")
    taken = {i.name for i in graph.input} | {o.name for o in graph.output}
    for name in (SALIENCY, SALIENCY_CLASS) + ((TARGET,) if top_k == 0 else ()):
        if name in taken or name in produced:
            raise UnsupportedModelError(f"{where}: the model already has a tensor named {name!r}.")

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    ctx = ExportContext(graph, opset, feature, layout, scores, net.num_classes, top_k=max(top_k, 1), head=head,
                        ir_version=model.ir_version)
    ctx.require_opset(7, "the explanation branch (numpy-style broadcasting in Add, Mul, ...)")
    _measure(net, source, ctx, head.tensors | head.inputs | {ctx.feature})
    ctx.feature_branch = _branch_feature(ctx, graph, feature)
    # other tensors the head reads that a fused op makes (a residual branch's Conv): computed again too
    fused = {t: _recomputed(ctx, graph, t) for t in sorted(head.inputs) if t in ctx.shapes}
    fused = {t: v for t, v in fused.items() if v is not None}
    mapping = head.copy(ctx, ctx.feature_branch, inputs=fused)
    scores_copy = mapping[scores]
    # the classes ranked on the source's own scores where they are an output of the graph (computed and
    # kept anyway: a reader changes nothing in how the source's nodes run), else on the copy's
    source_outputs = {o.name for o in source.graph.output}
    ranked = scores if scores in source_outputs else scores_copy
    shape = ctx.shape(scores)
    flat = ranked if shape is not None and len(shape) == 2 else ctx.node("Flatten", [ranked], axis=1)
    if top_k == 0 and targets_per_image:
        graph.input.append(helper.make_tensor_value_info(TARGET, onnx.TensorProto.INT64, [_batch_dim(source, net.input.name), "K"]))
        classes = TARGET
    elif top_k == 0:
        graph.input.append(helper.make_tensor_value_info(TARGET, onnx.TensorProto.INT64, [_batch_dim(source, net.input.name)]))
        classes = ctx.unsqueeze(TARGET, [1])
    else:
        if opset >= 10:
            _, classes = ctx.node("TopK", [flat, ctx.const(np.asarray([top_k], np.int64), "k")], n_outputs=2, axis=1)
        else:
            _, classes = ctx.node("TopK", [flat], n_outputs=2, axis=1, k=top_k)
    ctx.node("Identity", [classes], outputs=[SALIENCY_CLASS])
    ctx.classes = SALIENCY_CLASS

    def differentiate() -> str:
        d_head, d_mapping = head, mapping
        early = ctx.early_head()
        if early is not None:  # the gradient through the head that reads the class token early
            d_head, d_mapping = early, early.copy(ctx, ctx.feature_branch, inputs=fused)
        arange = ctx.const(np.arange(net.num_classes, dtype=np.int64), "classes")
        hot = ctx.node("Equal", [ctx.unsqueeze(ctx.classes, [2]), arange])  # (N, K, classes)
        seed = ctx.node("Cast", [ctx.node("Transpose", [hot], perm=[1, 0, 2])], to=ctx.elem_type(scores))
        seed = ctx.reshape_like(seed, scores, d_mapping[d_head.scores])
        # scores (N, classes): the seed's rows are one-hot, and a Gemm or MatMul making the scores
        # gathers the classes' weights (the one-hot seed then goes unused and is dropped)
        shape = ctx.shape(scores)
        one_hot = shape is not None and len(shape) == 2 and shape[0] == ctx.measured_batch \
            and shape[1] == net.num_classes
        indices = ctx.node("Transpose", [ctx.classes], perm=[1, 0]) if one_hot else None  # (K, N)
        return Backward(ctx, d_head, d_mapping, constant_values(graph)).run(seed, indices)

    ctx._differentiate = differentiate
    ctx._read_early = lambda: _token_early(net, source, ctx, head) if layout.kind == "tokens" else None
    ctx.diagnostics = {} if diagnostics else None
    maps = EXPORTERS[method](ctx)
    for key, tensor in (ctx.diagnostics or {}).items():
        ctx.node("Identity", [tensor], outputs=[f"{SALIENCY}_{key}"])
        graph.output.append(helper.make_tensor_value_info(f"{SALIENCY}_{key}", onnx.TensorProto.FLOAT, None))
    if map_size == "input":
        maps = ctx.node("Relu", [resize_maps(ctx, maps, net.input_size, layout.grid)])
    ctx.node("Identity", [maps], outputs=[SALIENCY])
    k = "K" if targets_per_image else max(top_k, 1)
    graph.output.append(helper.make_tensor_value_info(SALIENCY, onnx.TensorProto.FLOAT, [None, k, None, None]))
    graph.output.append(helper.make_tensor_value_info(SALIENCY_CLASS, onnx.TensorProto.INT64, [None, k]))
    _own_constants(ctx, graph, source_nodes)
    _prune(ctx, graph, source_nodes, source_initializers, bypass=method in ("gradcam", "gradcam_plus_plus"))
    _metadata(net, model, method, layer_name, top_k, map_size, layout)
    return model


#: constant types that onnxruntime's CPU provider computes in float32 through Casts it inserts
LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _own_constants(ctx: ExportContext, graph, source_nodes: int) -> None:
    """float16 / bfloat16 weights that the branch's nodes share with the source's get a copy of their own
    in the branch. onnxruntime's CPU provider runs float16 nodes in float32 through Casts it inserts;
    a weight read only by the source's nodes is converted once at load (a constant: a Gemm or MatMul
    then packs it), but a weight the branch reads too keeps a Cast at run time, the source's Gemm then
    multiplies by a computed tensor (not packed: another order of summation) and its outputs move by
    one float16 step. With its own copy, the source's graph is optimised as without the branch."""
    constants = {t.name: t for t in graph.initializer if t.data_type in LOW_PRECISION}
    for n in graph.node[:source_nodes]:
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value" \
                and n.attribute[0].t.data_type in LOW_PRECISION:
            constants.setdefault(n.output[0], n.attribute[0].t)
    shared = constants.keys() & {i for n in graph.node[:source_nodes] for i in n.input}
    copies: dict[str, str] = {}
    for node in graph.node[source_nodes:]:
        for j, name in enumerate(node.input):
            if name not in shared:
                continue
            if name not in copies:
                copies[name] = ctx.const(numpy_helper.to_array(constants[name]), "branch_weight")
            node.input[j] = copies[name]


def _prune(ctx: ExportContext, graph, source_nodes: int, source_initializers: int, bypass: bool) -> None:
    """The branch without what nothing reads: nodes whose outputs are neither read nor outputs (the
    head's forward copy where no rule needs its values, the one-hot seed where the weights were
    gathered), then the branch's initializers nothing reads. With ``bypass`` (the CAMs), the feature
    read apart (``_distinct``) where no copy of a source node reads it any more: the branch then reads
    the feature itself (nothing in it is a copy onnxruntime could merge with the source's nodes)."""
    source, branch = list(graph.node[:source_nodes]), list(graph.node[source_nodes:])
    read = {o.name for o in graph.output} | {i for n in source for i in reads(n)}
    kept = _live(branch, read)
    if bypass and ctx.feature_branch and ctx.feature_branch != ctx.feature \
            and ctx.layout is not None and ctx.layout.kind == "CHW":
        producer = next((n for n in kept if ctx.feature_branch in n.output), None)
        readers = [n for n in kept if ctx.feature_branch in n.input]
        copies = tuple(f"explain/{c}" for c in ("fwd/node", "recomputed_feature_node"))
        if producer is not None and producer.op_type in ("Where", "Max") \
                and not any(n.name.startswith(copies) for n in readers):
            for n in readers:
                for j, name in enumerate(n.input):
                    if name == ctx.feature_branch:
                        n.input[j] = ctx.feature
            kept = _live([n for n in kept if n is not producer], read)
    if len(kept) != len(branch):
        del graph.node[source_nodes:]
        graph.node.extend(kept)
    used = {i for n in graph.node for i in reads(n)}
    ours = [t for t in graph.initializer[source_initializers:] if t.name in used]
    if len(ours) != len(graph.initializer) - source_initializers:
        del graph.initializer[source_initializers:]
        graph.initializer.extend(ours)


def _live(nodes: list, read: set) -> list:
    """``nodes`` (in order) less those whose outputs nothing reads (``read``: what else reads)."""
    read, kept = set(read), []
    for n in reversed(nodes):
        if any(o and o in read for o in n.output):
            kept.append(n)
            read.update(i for i in n.input if i)
    return kept[::-1]


def _distinct(ctx: ExportContext, feature: str) -> str:
    """The feature under another name that onnxruntime's optimiser keeps apart: copied nodes reading
    the feature itself would be merged with the originals (common subexpression elimination), and the
    gradient's reads of the head's inner tensors would then stop fusions of the original graph
    (a Gelu, a SkipLayerNormalization) and change its outputs' last bits. Where(true, x, x) is kept."""
    if ctx.opset >= 9:
        name = ctx.node("Where", [ctx.const(np.asarray([True]), "true"), feature, feature])
    else:  # no Where before opset 9
        name = ctx.node("Max", [feature, feature])
    ctx.known(name, feature)
    return name


#: ops whose output onnxruntime fuses into the next op (Conv + Add + Relu, MatMul + Add, Gemm + Relu):
#: a second reader of such a feature would stop the fusion and change the source's outputs' last bits,
#: so the branch computes the feature again from the op's inputs (read apart, ``_distinct``)
RECOMPUTED = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def _branch_feature(ctx: ExportContext, graph, feature: str) -> str:
    """The tensor the explanation branch reads for the feature layer: the feature read apart, or
    computed again where its producer is an op onnxruntime fuses with its consumer."""
    return _recomputed(ctx, graph, feature) or _distinct(ctx, feature)


def _recomputed(ctx: ExportContext, graph, feature: str) -> str | None:
    """``feature`` computed again by a copy of its producer (inputs read apart) where that producer is
    one of ``RECOMPUTED``; None otherwise."""
    producer = next((n for n in graph.node if feature in n.output), None)
    constant = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    if producer is None or producer.op_type not in RECOMPUTED or len([o for o in producer.output if o]) != 1:
        return None
    copied = onnx.NodeProto()
    copied.CopyFrom(producer)
    copied.name = ctx.name("recomputed_feature_node")
    del copied.input[:]
    copied.input.extend(_distinct(ctx, i) if i and i not in constant else i for i in producer.input)
    del copied.output[:]
    name = ctx.name("feature")
    copied.output.append(name)
    graph.node.append(copied)
    ctx.known(name, feature)
    return name


def _feature_layer(net, feature_layer, where):
    if feature_layer is None:  # the library's default
        from ..runtime.feature_layers import default_feature_layer

        feature_layer = default_feature_layer(net)[0]
    layer = net.layer(feature_layer)
    layout = net.feature_map_layout(layer, where)
    if layout is None:
        raise LayerNotFeatureMapError(
            f"{where}: layer {layer.name!r} ({layer.op_type}) has activations of shape {layer.shape} per image, "
            "not a feature map ((C, H, W), tokens on the image's grid, or (H, W, C)); pass feature_layer= "
            "a layer with spatial extent (explainer.gradcam_layers(net) gives the default, net.layers() all).")
    return layer.output, layer.name, layout


def _batch_dim(model, name):
    for i in model.graph.input:
        if i.name == name:
            d = i.type.tensor_type.shape.dim[0]
            return d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
    return None


def _measure(net, source, ctx: ExportContext, names, arrays: dict | None = None) -> None:
    """Shapes, dtypes and small integer values of tensors ``names`` (the head's) into ``ctx``'s tables,
    from one onnxruntime run of the source graph (a batch of 2 where the graph takes any batch, so that
    broadcasting over the batch shows); ``arrays``: a dict filled with the values of the tensors it
    names (keys) on that run."""
    extra = [i.name for i in source.graph.input
             if i.name != net.input.name and i.name not in {t.name for t in source.graph.initializer}]
    if extra:
        raise UnsupportedModelError(f"export_explained: the model has another input {extra[0]!r}; only "
                                    "single-input classifiers are exported.")
    dynamic = not isinstance(_batch_dim(source, net.input.name), int)
    batch = 2 if dynamic else 1
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (batch + 1, *net.input_size, net.input.channels)).astype(np.float32)
    x = net.to_model_input(pixels)
    feeds = {net.input.name: x[:batch]}
    # a second run at batch 3 tells which axes follow the batch (the branch then writes the others'
    # extents as constants); a graph with a fixed batch has none
    batch_axes = {}
    shapes, dtypes, values = measure(source, feeds, names, batch_axes=batch_axes,
                                     other_feeds={net.input.name: x} if dynamic else None, arrays=arrays)
    ctx.shapes.update(shapes)
    ctx.dtypes.update(dtypes)
    ctx.values.update(values)
    ctx.dynamic.update(batch_axes if dynamic else {name: frozenset() for name in shapes})
    ctx.measured_batch = batch


def _token_early(net, source, ctx: ExportContext, head: Head) -> Head | None:
    """The head that reads the class token early (``head.early_head``) added to ``ctx.graph``'s tables,
    for the gradient: its tensors measured on a run of the source graph with it, and its scores checked
    there against the whole head's (kept where they differ beyond float32 rounding, 1e-5 of the largest
    score, as the library's Recipro-CAM checks its copy); None where it does not apply."""
    found = early_head(source, head, ctx.layout, ctx.shapes, ctx.dtypes, ctx.dynamic, ctx.values,
                       ctx.name("early") + "/")
    if found is None:
        return None
    nodes, initializers, scores, roots = found
    probe = onnx.ModelProto()
    probe.CopyFrom(source)
    probe.graph.node.extend(nodes)
    probe.graph.initializer.extend(initializers)
    arrays = {head.scores: None, scores: None}
    _measure(net, probe, ctx, {o for n in nodes for o in n.output if o} | set(roots), arrays=arrays)
    whole, early = (np.asarray(arrays[t], np.float64) for t in (head.scores, scores))
    if whole.shape != early.shape or np.abs(whole - early).max() > 1e-5 * max(np.abs(whole).max(), 1e-30):
        return None
    if ctx.ir_version < 4:  # initializers must then be graph inputs too: Constant nodes instead
        ctx.graph.node.extend(helper.make_node("Constant", [], [t.name], name=ctx.name("Constant_node"), value=t)
                              for t in initializers)
    else:
        ctx.graph.initializer.extend(initializers)
    return Head(helper.make_graph(nodes, "early_head", [], []), head.feature, scores, roots=roots)


def _metadata(net, model, method, layer, top_k, map_size, layout) -> None:
    from ..version import __version__

    props = {p.key: p for p in model.metadata_props}
    p = net.preprocessing
    entries = {
        "onnx_explainer.export.method": method,
        "onnx_explainer.export.layer": layer,
        "onnx_explainer.export.layout": layout.describe(),
        "onnx_explainer.export.top_k": str(top_k),
        "onnx_explainer.export.map_size": map_size,
        "onnx_explainer.export.outputs": json.dumps({"saliency": "float32 (N, K, h, w)", "saliency_class": "int64 (N, K)",
                                                     **({"target (input)": "int64 (N,)"} if top_k == 0 else {})}),
        "onnx_explainer.version": __version__,
        "onnx_explainer.preprocessing": json.dumps({"mean": list(p.mean), "std": list(p.std), "scale": p.scale,
                                                    "channel_order": p.channel_order}),
        "onnx_explainer.labels": json.dumps(list(net.class_names)),
    }
    for key, value in entries.items():
        if key in props:
            props[key].value = value
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def _check_destination(out, where) -> Path:
    if not isinstance(out, (str, os.PathLike)):
        raise InvalidParameterError(f"{where}: out must be a file path; got {type(out).__name__}.")
    path = Path(out)
    if path.is_dir():
        raise ExportWriteError(f"{where}: {str(path)!r} is a folder; pass a file path such as {str(path / 'model.onnx')!r}.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportWriteError(f"{where}: the folder {str(parent)!r} does not exist; create it or pass another out=.")
    if not os.access(parent, os.W_OK):
        raise ExportWriteError(f"{where}: the folder {str(parent)!r} is not writable; pass an out= in a writable folder.")
    return path


def _write(model: onnx.ModelProto, path: Path, external_data, where: str) -> Path:
    size = model.ByteSize()
    external = external_data if external_data is not None else size >= TWO_GB
    try:
        if not external:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UnsupportedModelError(f"{where}: the written graph fails onnx.checker: {str(exc)[:400]}") from None
    tmp_dir = None
    try:
        tmp_dir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")
        tmp = Path(tmp_dir) / path.name
        if external:
            data = path.name + ".data"
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
            onnx.checker.check_model(str(tmp), full_check=True)
            os.replace(Path(tmp_dir) / data, path.parent / data)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportWriteError(f"{where}: cannot write {str(path)!r}: {exc.strerror or exc}. Free space there or pass "
                               "another out=.") from None
    finally:
        if tmp_dir is not None:
            import shutil

            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
