"""Gradients: the normalised graph converted by onnx2torch into a ``torch.nn.Module``, checked once
against onnxruntime, and wrapped so that it takes the user's pixels.

``PixelModel`` maps N x C x h x w RGB pixels (0..255, at any size h x w) to the class logits: an
antialiased bicubic resize to the graph's size, our preprocessing, the graph's layout, then the
converted graph. Gradients therefore reach the image the user passed, through every preprocessing step
(ours and any inside the graph).
"""
from __future__ import annotations

import functools
import threading
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import onnx

from ..convert import BATCH_PASSES, PassContext, normalise
from ..convert.ops import check_differentiable
from ..convert.precision import is_half
from ..convert.quantized import is_quantized, output_quantisation_step
from ..errors import ConversionError, ExplainerError, UnknownLayerError
from .budget import IN_FLIGHT, allocation_error, is_allocation_failure

if TYPE_CHECKING:
    from .classifier import Classifier

MAX_RELATIVE_ERROR = 1e-4
#: for graphs computing in float16: onnxruntime rounds every intermediate to 11 bits, torch does not
MAX_RELATIVE_ERROR_HALF = 2e-2
_LOCK = threading.Lock()


def _torch():
    import torch

    return torch


@functools.cache
def pixel_model_class():
    """The ``PixelModel`` class, defined on first use: subclassing ``torch.nn.Module`` at import would
    make every ``import explainer`` (and ``explainer --help``) pay for importing torch."""

    class PixelModel(_torch().nn.Module):
        """Pixels (N, C, h, w) in 0..255, RGB → logits (N, K) of the converted graph."""

        #: set by the engine: the run budget's checks, and its count of the passes in flight
        guard = None
        account = None

        def __init__(self, graph_module, spec, preprocessing, logits_index: int, one_at_a_time: bool = False):
            super().__init__()
            torch = _torch()
            self.graph = graph_module
            self.one_at_a_time = one_at_a_time
            self.size = spec.size
            self.nhwc = spec.layout == "NHWC"
            c = spec.channels
            self.to_gray = c == 1
            self.bgr = preprocessing.channel_order == "BGR" and c == 3
            mean = preprocessing.mean if len(preprocessing.mean) == 3 else preprocessing.mean * 3
            std = preprocessing.std if len(preprocessing.std) == 3 else preprocessing.std * 3
            if self.bgr:
                mean, std = mean[::-1], std[::-1]  # applied before the flip, so in RGB order
            self.register_buffer("mean", torch.tensor(mean[:c] if c == 3 else mean[:1], dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std[:c] if c == 3 else std[:1], dtype=torch.float32).view(1, -1, 1, 1))
            self.scale = float(preprocessing.scale)
            self.logits_index = logits_index

        def model_input(self, pixels, native_size: bool = False):
            """The graph's input for ``pixels``, resized to the graph's input size unless
            ``native_size`` (for fully convolutional graphs run at another size, as deep dream does)."""
            torch = _torch()
            F = torch.nn.functional
            # one memory layout whatever the caller passes (a permuted HWC array is channels-last): the
            # kernels, and so the float rounding that decides ReLU gates near zero, are then the same
            x = pixels.contiguous()
            if not native_size and tuple(x.shape[-2:]) != tuple(self.size):
                x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False)
                x = x.clamp(0.0, 255.0)
            if self.to_gray and x.shape[1] == 3:
                x = (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            elif not self.to_gray and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = (x * self.scale - self.mean) / self.std
            if self.bgr:
                x = x.flip(1)
            if self.nhwc:
                x = x.permute(0, 2, 3, 1)
            return x

        def forward(self, pixels, native_size: bool = False):
            return self.logits(self.model_input(pixels, native_size))

        def logits(self, x):
            """Logits (N, K) for a batch in the graph's input form; a graph that keeps its exported batch
            of 1 runs image by image (gradients flow through the concatenation)."""
            if self.one_at_a_time and len(x) > 1:
                return _torch().cat([self.logits(x[i:i + 1]) for i in range(len(x))])
            guard = self.guard
            if guard is not None:  # a pass that keeps its graph for backward keeps every intermediate
                grad = _torch().is_grad_enabled()
                guard.check(tuple(x.shape), torch=grad)
                if self.account is not None:
                    self.account(guard.need(tuple(x.shape), torch=grad))
            out = self.graph(x)
            if isinstance(out, (tuple, list)):
                out = out[self.logits_index]
            return out.reshape(out.shape[0], -1)

    return PixelModel


class TorchEngine:
    """The converted module of one classifier, with hooks addressed by original ONNX names."""

    def __init__(self, net, device: str = "auto"):
        # the classifier keeps its engines: a weak reference back, so that no cycle keeps both alive
        self._net = weakref.ref(net)
        self.device = resolve_torch_device(device)
        source = net.source_model
        logits = net.gradient_scores
        check_differentiable(source, net.input.name, logits)  # on the original names, for the message
        self.half = is_half(source)
        self.quantized = is_quantized(source)
        ctx = PassContext(net.input.name, image_shape=_image_shape(net.input))
        one_at_a_time = net.max_batch == 1
        model, self.log = normalise(source, "torch", net.input.name, ctx,
                                    skip=BATCH_PASSES if one_at_a_time else ())
        safe_logits = ctx.renamed["tensors"][logits]
        outputs = [o.name for o in model.graph.output]
        if safe_logits not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(safe_logits, onnx.TensorProto.FLOAT, None))
            outputs.append(safe_logits)
        self.tensor_names: dict[str, str] = ctx.renamed["tensors"]
        self.node_names: dict[str, str] = ctx.renamed["nodes"]
        self.original_nodes = {safe: original for original, safe in self.node_names.items()}
        self.op_types = {node.name: node.op_type for node in model.graph.node}
        from ..convert.attributes import check_attributes

        check_attributes(model, self.original_nodes)
        try:
            graph_module = _onnx2torch(model, self.tensor_names[net.input.name], ctx.image_shape)
        except Exception as exc:
            raise ConversionError(
                f"onnx2torch cannot convert model {net.name!r}{self._failing_node(exc)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Occlusion and "
                "LIME (onnxruntime) still work.") from None
        graph_module.eval()
        for p in graph_module.parameters():
            p.requires_grad_(False)
        self.graph_module = graph_module
        self.producers = {}
        for node in model.graph.node:
            for k, out in enumerate(node.output):
                self.producers[out] = (node.name, k)
        self.pixel_model = pixel_model_class()(graph_module, net.input, net.preprocessing, outputs.index(safe_logits),
                                      one_at_a_time).eval()
        self.pixel_model.to(self.device)
        self.pixel_model.guard = net.ort.guard  # the run budget and the shape checks of onnxruntime's graph
        self.pixel_model.account = self._account
        self._turn = threading.RLock()
        self._held = threading.local()  # the bytes counted in budget.IN_FLIGHT for this thread's turn
        with self.exclusive():
            self.max_relative_error = self._check_against_onnxruntime(logits)
        #: image sizes other than the input's at which the module was tried, and whether it runs there
        #: (fully convolutional, with a global pool before the scores); filled by deep dream
        self.runs_at_size: dict[tuple[int, int], bool] = {}

    @property
    def net(self):
        return self._net()

    def _failing_node(self, exc: BaseException) -> str:
        """' at node NAME (OP)' for the ONNX node whose conversion raised ``exc``, read from the
        converter's frame (onnx2torch does not say), or ''."""
        tb = exc.__traceback__
        found = None
        while tb is not None:
            node = tb.tb_frame.f_locals.get("onnx_node")
            if node is not None and hasattr(node, "name"):
                found = node
            tb = tb.tb_next
        if found is None:
            return ""
        return f" at node {self.original_nodes.get(found.name, found.name)!r} ({found.operation_type})"

    def _run_node_by_node(self, x) -> str:
        """' at node NAME (OP)' for the first module of the converted graph that raises on ``x``."""
        torch = _torch()

        class Finder(torch.fx.Interpreter):
            failed = None

            def run_node(self, n):
                try:
                    return super().run_node(n)
                except Exception:
                    Finder.failed = n.target if n.op == "call_module" else n.name
                    raise

        try:
            with torch.no_grad():
                Finder(self.graph_module).run(x)
        except Exception:
            pass
        name = str(Finder.failed or "")
        if not name:
            return ""
        return f" at node {self.original_nodes.get(name, name)!r} ({self.op_types.get(name, 'unknown op')})"

    def _check_against_onnxruntime(self, logits: str) -> float:
        torch = _torch()
        net = self.net
        rng = np.random.default_rng(12345)
        pixels = rng.uniform(0, 255, (2, *net.input.size, net.input.channels)).astype(np.float32)
        if net.input.dtype == np.uint8:
            pixels = np.rint(pixels)
        inputs = net.to_model_input(pixels)
        expected = net.ort.reference.run_batched(inputs, [logits], net.max_batch or 2)[0]
        expected = expected.reshape(2, -1).astype(np.float64)
        x = self.tensor(pixels).permute(0, 3, 1, 2)
        try:
            with torch.no_grad():
                got = self.pixel_model(x).double().cpu().numpy()
        except ExplainerError:
            raise
        except Exception as exc:
            if is_allocation_failure(exc):
                raise allocation_error(exc, f"torch (the converted module of {net.name!r})") from None
            where = self._run_node_by_node(self.pixel_model.model_input(x[:1]))
            raise ConversionError(
                f"the converted torch module of {net.name!r} fails{where}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}; gradient methods are refused for "
                "this model. Occlusion and LIME (onnxruntime) still work.") from None
        allowed = MAX_RELATIVE_ERROR_HALF if self.half else MAX_RELATIVE_ERROR
        if self.quantized:
            allowed = max(allowed, self._quantised_tolerance(logits, inputs, expected))
        error = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))
        spread = None
        if not error <= allowed and not self.quantized:  # a graph whose float32 evaluation is itself that loose?
            spread = self._float_spread(logits, inputs, expected)
            allowed = max(allowed, 2 * spread)
        self.allowed_relative_error = allowed
        if not error <= allowed:
            own = (f"; onnxruntime's own evaluations of the graph differ by {spread:.1e}" if spread is not None else "")
            raise ConversionError(
                f"the converted torch module of {net.name!r} differs from onnxruntime: relative max error "
                f"{error:.2e} on pre-softmax scores (allowed {allowed:.1e}{own}); gradient methods "
                "are refused for this model. Occlusion and LIME (onnxruntime) still work.")
        return error

    def _float_spread(self, logits: str, inputs: np.ndarray, expected: np.ndarray) -> float:
        """How far two correct float evaluations of the graph's scores are apart, relative to their
        largest magnitude: onnxruntime's optimised session against its node-by-node evaluation (no
        fusions), and against the same inputs nudged by 1e-6 of themselves (the float32 rounding of the
        input). On a well-conditioned graph about 1e-6; on one that amplifies rounding (Hugging Face's
        LeViT-128S with seeded weights: 2e-4 to 7e-4, and 1.6e-3 for the nudge) as large as what a
        correct conversion differs by, so the module may differ by twice it (``MAX_RELATIVE_ERROR`` at
        least). Measured only when the module is off by more than ``MAX_RELATIVE_ERROR``."""
        net = self.net
        size = net.max_batch or len(inputs)

        def scores(run, x):
            return np.concatenate([run(x[i:i + size], [logits])[0]
                                   for i in range(0, len(x), size)]).reshape(len(x), -1).astype(np.float64)

        scale = max(np.abs(expected).max(), 1e-12)
        spread = np.abs(scores(net.ort.reference.run_unoptimised, inputs) - expected).max() / scale
        if inputs.dtype.kind == "f":
            nudged = inputs * (1 + 1e-6 * np.random.default_rng(0).standard_normal(inputs.shape))
            spread = max(spread, np.abs(scores(net.ort.reference.run, nudged.astype(inputs.dtype)) - expected).max() / scale)
        return float(spread)

    def _quantised_tolerance(self, logits: str, inputs: np.ndarray, expected: np.ndarray) -> float:
        """How far the converted module of a quantized graph may be from onnxruntime. Rounding to
        integers turns float differences of 1e-7 into whole quantisation steps, which later layers
        carry on, so two correct evaluations of the same graph differ: onnxruntime's fused int8
        kernels and its node-by-node evaluation do, and so do two runs on inputs 1e-6 apart. The
        module may differ by twice the larger of those spreads (``_float_spread``), and always by two
        quantisation steps of the scores (when they are quantized)."""
        spread = self._float_spread(logits, inputs, expected)
        step = output_quantisation_step(self.net.source_model, logits)
        return float(max(2 * spread, 2 * step / max(np.abs(expected).max(), 1e-12)))

    def tensor(self, array: np.ndarray):
        """A float32 numpy array as a tensor on the engine's device."""
        return _torch().from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def logits_from_model_input(self, x):
        """Logits (N, K) for a batch already in the graph's input form (float, normalised, laid out)."""
        return self.pixel_model.logits(x)

    # addressing layers ----------------------------------------------------------------------------
    def module_for(self, layer_name: str):
        """(submodule, output index) computing the original ONNX layer or tensor ``layer_name``."""
        layer = self.net.layer(layer_name)
        safe = self.tensor_names.get(layer.output)
        if safe is None or safe not in self.producers:
            raise UnknownLayerError(f"layer {layer_name!r} has no counterpart in the converted module.")
        node, index = self.producers[safe]
        try:
            return self.graph_module.get_submodule(node), index
        except AttributeError:
            raise UnknownLayerError(
                f"layer {layer_name!r} was folded into constants during conversion; pick a layer that "
                "depends on the image.") from None

    def largest_batch(self, requested: int) -> int:
        """``requested`` images per pass, lowered to what the run budget allows for a pass that keeps
        its graph for backward (every intermediate held); at least 1."""
        guard = getattr(self.pixel_model, "guard", None)
        if guard is None:
            return requested
        return max(1, min(requested, guard.max_batch(self.net.per_image_shape, torch=True)))

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held while a thread uses the module: hooks (Grad-CAM's recorded layers, guided
        backpropagation's ReLUs) belong to the module, not to a call, so a second thread's forward pass
        would feed or be rewritten by them. Re-entrant; onnxruntime sessions need no such turn. On
        CUDA, TF32 is off meanwhile (see ``float32_exact``)."""
        with self._turn, float32_exact(self.device):
            outer = getattr(self._held, "stack", None) is None
            if outer:  # the turn's passes are counted among the runs in flight until it ends
                self._held.stack, self._held.bytes = ExitStack(), 0
            try:
                yield
            except ExplainerError:
                raise
            except Exception as exc:  # torch's allocators raise RuntimeError (or MemoryError)
                if is_allocation_failure(exc):
                    raise allocation_error(exc, "torch") from None
                raise
            finally:
                if outer:
                    stack, self._held.stack = self._held.stack, None
                    stack.close()

    def _account(self, need: int) -> None:
        """A pass of ``need`` bytes in this thread's turn: the turn is counted in ``budget.IN_FLIGHT``
        for its largest pass (its first waits for room there; a pass outside a turn is not counted)."""
        stack = getattr(self._held, "stack", None)
        if stack is None or need <= self._held.bytes:
            return
        stack.enter_context(IN_FLIGHT.hold(need - self._held.bytes))
        self._held.bytes = need

    @contextmanager
    def capture(self, layer_names: Sequence[str]) -> Iterator["Captured"]:
        """Records the output tensors of the given layers during forward passes; hooks always removed.
        The engine is held meanwhile (``exclusive``)."""
        captured = Captured()
        handles = []
        with self.exclusive():
            try:
                for name in layer_names:
                    module, index = self.module_for(name)

                    def hook(mod, args, output, name=name, index=index):
                        captured.parts.setdefault(name, []).append(
                            output[index] if isinstance(output, (tuple, list)) else output)

                    handles.append(module.register_forward_hook(hook))
                yield captured
            finally:
                for h in handles:
                    h.remove()


def _onnx2torch(model: onnx.ModelProto, image: str, image_shape: list | None = None):
    """onnx2torch's module of a graph normalised for torch (with our converters in its registry)."""
    import onnx2torch

    from ..convert import converters  # noqa: F401  (our converters join onnx2torch's registry)
    from ..convert.converters.control_flow import OPSETS

    token = OPSETS.set(tuple(model.opset_import))  # subgraphs convert at the model's opset
    try:
        with warnings.catch_warnings(), _shapes_inferred_without_weights(model, image, image_shape):
            warnings.simplefilter("ignore")
            return onnx2torch.convert(model)
    finally:
        OPSETS.reset(token)


def convert_graph(source: onnx.ModelProto, image: str, image_shape: list | None = None,
                  one_at_a_time: bool = False):
    """(module, PassContext): ``source`` normalised for torch, its attributes checked and converted as
    a classifier's graph is, outside any classifier (tests, and comparing a graph node by node with
    onnxruntime: the context maps original names to the module's; ``one_at_a_time``: the batch passes
    left out, as for a graph that keeps its exported batch). Raises ConversionError for an attribute
    the conversion does not honour, onnx2torch's own error otherwise."""
    from ..convert.attributes import check_attributes

    ctx = PassContext(image, image_shape=image_shape)
    model, _ = normalise(source, "torch", image, ctx, skip=BATCH_PASSES if one_at_a_time else ())
    check_attributes(model, {safe: original for original, safe in ctx.renamed["nodes"].items()})
    module = _onnx2torch(model, ctx.renamed["tensors"][image], image_shape).eval()
    return module, ctx


def _image_shape(spec) -> list:
    """The image input's shape at batch 1 in the graph's layout."""
    h, w = spec.size
    return [1, spec.channels, h, w] if spec.layout == "NCHW" else [1, h, w, spec.channels]


@contextmanager
def _shapes_inferred_without_weights(model: onnx.ModelProto, image: str | None = None,
                                     image_shape: list | None = None):
    """onnx2torch infers shapes on the whole model, serialising every weight there and back (VGG19:
    1.7 GB more at the peak). The same inference on a copy without weight data gives the same shapes:
    they are written into ``model`` and onnx2torch's inference is skipped while it converts. Where a
    converter reads a shape that inference lost (``converters.SHAPE_READERS``), the shape measured in
    onnxruntime is written instead, its batch-dependent dims symbolic (see ``_measured_value_info``)."""
    import onnx2torch.converter as converter

    from ..graph import infer_shapes

    declared = {vi.name for vi in list(model.graph.input) + list(model.graph.output)}
    weights = {t.name for t in model.graph.initializer}
    inferred = {name: vi for name, vi in infer_shapes(model).items() if name not in declared and name not in weights}
    if image is not None:
        inferred.update(_measured_value_info(model, image, image_shape, inferred))
    model.graph.value_info.extend(inferred.values())
    original = converter.safe_shape_inference
    converter.safe_shape_inference = lambda m, **kwargs: m
    try:
        yield
    finally:
        converter.safe_shape_inference = original


def _measured_value_info(model: onnx.ModelProto, image: str, image_shape: list | None,
                         inferred: dict) -> dict[str, onnx.ValueInfoProto]:
    """Shapes for the inputs of nodes whose converter reads one (``converters.SHAPE_READERS``) where
    inference gave none or an incomplete one, measured in onnxruntime: at batch 1 and 2 where the batch
    is free, the dims that differ written symbolic (``N``-like names), the others as measured. Only
    those tensors are fetched, so the run holds little more memory than a plain one."""
    from ..convert.converters import SHAPE_READERS
    from ..graph import dims, measured_dims

    def complete(name):
        vi = inferred.get(name)
        return vi is not None and vi.type.tensor_type.HasField("shape") and None not in dims(vi)[1:]

    wanted = [n.input[0] for n in model.graph.node if n.op_type in SHAPE_READERS and n.input and not complete(n.input[0])]
    if not wanted:
        return {}
    size = None if image_shape is None else [None, *image_shape[1:]]
    found = {}
    for name, shape in measured_dims(model, image, wanted, size).items():
        elem = inferred[name].type.tensor_type.elem_type if name in inferred else onnx.TensorProto.FLOAT
        found[name] = onnx.helper.make_tensor_value_info(
            name, elem, [d if d is not None else f"{name}_batch{j}" for j, d in enumerate(shape)])
    return found


class Captured:
    """Layer outputs recorded in a forward pass: one tensor per run of the layer, several when a
    batch-1 graph runs image by image."""

    def __init__(self):
        self.parts: dict[str, list] = {}

    def __contains__(self, name) -> bool:
        return name in self.parts

    def __getitem__(self, name):
        """The layer's output for the whole batch (part of the autograd graph)."""
        parts = self.parts[name]
        return parts[0] if len(parts) == 1 else _torch().cat(parts)

    def gradient(self, target, name):
        """d target / d (the layer's output), for the whole batch."""
        torch = _torch()
        grads = torch.autograd.grad(target, self.parts[name])
        return grads[0] if len(grads) == 1 else torch.cat(grads)


TORCH_DEVICES = ("auto", "cpu", "cuda")


@contextmanager
def float32_exact(device: str) -> Iterator[None]:
    """TF32 off while the block runs on CUDA, as it was after: TF32 matmuls and convolutions round
    to 10 bits, and the module must keep matching onnxruntime's float32 results (relative error 1e-4).
    The switches are process-wide, so they are set here, not for the user's other torch work."""
    if device != "cuda":
        yield
        return
    backends = _torch().backends
    before = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = before


def resolve_torch_device(device: str) -> str:
    """'auto' → 'cuda' when torch sees a GPU, else 'cpu'."""
    from ..errors import DeviceError, InvalidParameterError

    if device not in TORCH_DEVICES:
        raise InvalidParameterError(f"load: torch_device must be one of {TORCH_DEVICES}; got {device!r}.")
    torch = _torch()
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise DeviceError("torch_device='cuda' was requested but torch sees no CUDA GPU; use 'cpu' or 'auto'.")
    return "cpu" if device == "cpu" or not available else "cuda"


def torch_engine(net: Classifier) -> TorchEngine:
    """The converted module of a classifier, made on first use and kept by the classifier (so it goes
    when the classifier goes), one per torch device (``load(..., torch_device=)``)."""
    device = resolve_torch_device(getattr(net, "torch_device", "auto"))
    with _LOCK:
        engines = net.runtime.torch_engines
        if device not in engines:
            engines[device] = TorchEngine(net, device)
        return engines[device]
