"""A mutation check of the suite: hand-made wrong implementations, injected at run time one at a time,
must each make at least one quick test fail, and a test about that computation (not a side effect).
Run on demand, not in CI (a few minutes per mutant on 2 cores):

    python tests/mutations.py                 # every mutant, its candidate test files
    python tests/mutations.py gradcam-sum     # one
    python tests/mutations.py --list
    python tests/mutations.py --write docs/mutations.md

Each mutant runs ``pytest -m "not slow and not published"`` on its candidate files in a fresh process
with this file loaded as a plugin (``-p mutations``) and ``EXPLAINER_MUTANT`` naming the mutant; the
plugin patches the library (never the references: Captum, pytorch-grad-cam and the source torch models
run unchanged). A mutant is *caught* when one of the tests listed as about that computation fails; the
report lists every test that failed. First the candidate files run unmutated: a test already failing
there would count for nothing.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    files: tuple[str, ...]  # candidate quick test files (under tests/)
    direct: tuple[str, ...]  # regular expressions: a failing test id matching one is about this computation


MUTANTS = (
    Mutant("gradcam-sum", "Grad-CAM's channel weights summed over the grid instead of averaged",
           ("test_gradients.py", "test_cams.py", "test_methods.py", "test_properties.py"),
           (r"gradcam", r"grad_cam", r"cam")),
    Mutant("saliency-negated", "the signed gradient (d score / d pixel) negated",
           ("test_gradients.py", "test_conversion.py", "test_methods.py", "test_properties.py"),
           (r"saliency", r"gradient", r"captum")),
    Mutant("saliency-abs", "the signed gradient returned as its absolute value",
           ("test_gradients.py", "test_conversion.py", "test_methods.py", "test_properties.py"),
           (r"saliency", r"gradient", r"captum")),
    Mutant("occlusion-shift", "every occlusion window one pixel further down and right",
           ("test_blackbox.py", "test_methods.py", "test_incremental.py", "test_properties.py"),
           (r"occlusion", r"captum")),
    Mutant("lime-permuted-weights", "LIME's surrogate weights given to the wrong features (rolled by one)",
           ("test_blackbox.py", "test_lime_stop.py", "test_methods.py", "test_properties.py"),
           (r"lime",)),
    Mutant("lime-wrong-superpixels", "LIME's weights right, painted into the next superpixel",
           ("test_blackbox.py", "test_lime_stop.py", "test_methods.py", "test_properties.py"),
           (r"lime",)),
    Mutant("relu-backward-unmasked", "the converted ReLU passes every gradient back, negative inputs too",
           ("test_converters.py", "test_gradients.py", "test_conversion.py", "test_cams.py"),
           (r"relu", r"gradient", r"guided", r"backward", r"captum")),
    Mutant("relu6-backward-unbounded", "the converted Clip (ReLU6's cap) passes gradients above its maximum",
           ("test_converters.py", "test_gradients.py", "test_conversion.py", "test_load.py"),
           (r"relu6", r"clip", r"gradient", r"backward", r"captum")),
    Mutant("straight-through-negated", "the quantizer's straight-through gradient rule with the wrong sign",
           ("test_quantized.py", "test_converters.py"),
           (r"quant", r"int8", r"straight", r"qdq")),
    Mutant("batchnorm-no-epsilon", "the BatchNormalization converter ignores the node's epsilon (torch's 1e-5)",
           ("test_converters.py", "test_conversion.py"),
           (r"batchnorm", r"batch_norm", r"epsilon")),
)
BY_NAME = {m.name: m for m in MUTANTS}


# ---- the injections (applied by the plugin hook below, in the pytest process) ----------------------

def _relu_like(upper_bounded: bool):
    """A module with ReLU's (or Clip's) forward and a backward that ignores the bound it should apply."""
    import torch

    class Unmasked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, low, high):
            ctx.save_for_backward(x)
            ctx.low = low
            return torch.clamp(x, min=low, max=high)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            if upper_bounded:  # ReLU6 without its cap: masked below, passed above
                return grad * (x >= ctx.low), None, None
            return grad, None, None  # ReLU without its mask

    return Unmasked


def _mutate(name: str) -> None:
    import explainer  # noqa: F401  (first, as in conftest: it sets OpenMP's policy before torch loads)
    import numpy as np
    import torch

    if name == "gradcam-sum":
        from explainer.methods import gradcam

        gradcam.GradCAM.channel_weights = lambda self, a, g: g.sum(dim=(2, 3))
    elif name in ("saliency-negated", "saliency-abs"):
        from explainer.methods import saliency

        original = saliency.raw

        def raw(engine, x, indices):
            g = original(engine, x, indices)
            return -g if name == "saliency-negated" else g.abs()

        saliency.raw = raw
    elif name == "occlusion-shift":
        from explainer.methods import occlusion

        original = occlusion.mask_positions

        def mask_positions(size, mask, stride, clipping):
            return [(min(a + 1, size - 1), min(b + 1, size)) for a, b in original(size, mask, stride, clipping)]

        occlusion.mask_positions = mask_positions
    elif name == "lime-permuted-weights":
        from explainer.methods import lime

        original = lime.fit_surrogate
        lime.fit_surrogate = lambda *a, **k: np.roll(original(*a, **k), 1, axis=1)
    elif name == "lime-wrong-superpixels":
        from explainer.methods import lime

        original = lime.paint
        lime.paint = lambda values, segments, *a: original(values, (segments + 1) % (segments.max() + 1), *a)
    elif name in ("relu-backward-unmasked", "relu6-backward-unbounded"):
        from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY
        from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

        fn = _relu_like(upper_bounded=name == "relu6-backward-unbounded")
        op = "Relu" if name == "relu-backward-unmasked" else "Clip"

        class Relu(torch.nn.ReLU):  # still a ReLU for guided backpropagation's hooks
            def forward(self, x):
                return fn.apply(x, 0.0, None)

        class Clip(torch.nn.Module):
            def forward(self, x, low=None, high=None):
                low = -float("inf") if low is None else float(low)
                high = float("inf") if high is None else float(high)
                return fn.apply(x, low, high)

        def convert(node, graph):
            module = Relu() if op == "Relu" else Clip()
            return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

        for key in [k for k in _CONVERTER_REGISTRY if k.operation_type == op and k.domain == ""]:
            _CONVERTER_REGISTRY[key] = convert
    elif name == "straight-through-negated":
        from explainer.convert.converters import quantization

        def round_saturate(v, zero_point, low, high):
            q = torch.round(v.detach())
            if zero_point is not None:
                q = q + zero_point
            inside = (q >= low) & (q <= high)
            return q.clamp(low, high) - (v - v.detach()) * inside

        quantization._round_saturate = round_saturate
    elif name == "batchnorm-no-epsilon":
        from explainer.convert.converters import normalization

        original = normalization.BatchNorm.forward

        def forward(self, *args):  # torch's default epsilon, whatever the node says
            epsilon, self.epsilon = self.epsilon, 1e-5
            try:
                return original(self, *args)
            finally:
                self.epsilon = epsilon

        normalization.BatchNorm.forward = forward
    else:
        raise SystemExit(f"unknown mutant {name!r}; --list shows them")


def pytest_configure(config):
    name = os.environ.get("EXPLAINER_MUTANT")
    if name:
        _mutate(name)


# ---- the runner ------------------------------------------------------------------------------------

def _run(files, mutant: str | None, report: Path) -> set[str]:
    """The ids of the tests that failed (or errored)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("EXPLAINER_MUTANT", None)
    if mutant:
        env["EXPLAINER_MUTANT"] = mutant
    cmd = [sys.executable, "-m", "pytest", "-p", "mutations", "-q", "-m", "not slow and not published",
           "-p", "no:cacheprovider", "--junitxml", str(report), *[str(HERE / f) for f in files]]
    subprocess.run(cmd, cwd=HERE.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _failed(report)


def _failed(report: Path) -> set[str]:
    import xml.etree.ElementTree as ET

    failed = set()
    if not report.is_file():
        return {"<pytest did not run>"}
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}")
    return failed


def main(argv: list[str]) -> int:
    import tempfile

    if "--list" in argv:
        for m in MUTANTS:
            print(f"{m.name:28s} {m.what}")
        return 0
    write = argv[argv.index("--write") + 1] if "--write" in argv else None
    names = [a for a in argv if a in BY_NAME] or [m.name for m in MUTANTS]
    unknown = [a for a in argv if not a.startswith("-") and a not in BY_NAME and a != write]
    if unknown:
        raise SystemExit(f"unknown mutant(s) {unknown}; --list shows them")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline: dict[tuple[str, ...], set[str]] = {}
        for name in names:
            m = BY_NAME[name]
            if m.files not in baseline:
                baseline[m.files] = _run(m.files, None, Path(tmp) / f"base-{len(baseline)}.xml")
            start = time.perf_counter()
            failed = _run(m.files, name, Path(tmp) / f"{name}.xml") - baseline[m.files]
            direct = sorted(t for t in failed if any(re.search(p, t, re.I) for p in m.direct))
            results.append(dict(mutant=name, what=m.what, caught=bool(direct), direct=direct,
                                other=sorted(set(failed) - set(direct)), failing_unmutated=sorted(baseline[m.files]),
                                seconds=round(time.perf_counter() - start, 1)))
            print(f"{name}: {'caught' if direct else 'MISSED'} by {len(direct)} direct, "
                  f"{len(failed) - len(direct)} other ({results[-1]['seconds']} s)", flush=True)
            for t in direct:
                print("    ", t)
    text = _markdown(results)
    if write:
        Path(write).write_text(text)
        Path(write).with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0 if all(r["caught"] for r in results) else 1


def _markdown(results) -> str:
    lines = ["# Mutation check", "", f"`python tests/mutations.py`, {time.strftime('%Y-%m-%d')}: each wrong "
             "implementation injected alone; the quick tests (not slow) of its candidate files run.", "",
             "| mutant | what | caught | tests about it that failed | other failures |", "|---|---|---|---|---|"]
    for r in results:
        direct = "<br>".join(f"`{t}`" for t in r["direct"][:6]) + (f" (+{len(r['direct']) - 6})" if len(r["direct"]) > 6 else "")
        lines.append(f"| {r['mutant']} | {r['what']} | {'yes' if r['caught'] else '**no**'} | {direct or '–'} | "
                     f"{len(r['other'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
