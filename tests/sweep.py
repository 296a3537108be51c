"""Files we never showed the suite: a sweep of architectures outside the compatibility suite (timm
families and Hugging Face models built from configs, seeded), each put through every method as
tests/compat.py checks the suite's families, one model per process.

    python tests/sweep.py                      # every model below; writes sweep-results/ (gitignored)
    python tests/sweep.py --only coat_lite_tiny hf_cvt --out DIR

Per model: the export (the exporters in order, the first that writes a file), ``explainer.load``, the
Grad-CAM and Recipro-CAM engine decisions, ``recipro_cam``, ``export_explained`` (the source's outputs
bit-identical in onnxruntime, the saliency equal to the library's torch-path Grad-CAM within 1e-4 of its
range), the source module whose output equals our default layer's activations (the Grad-CAM
reference's target), then ``compat.check`` (every method against the source torch module). Each step's
outcome goes to ``OUT/NAME.json`` (tracebacks to ``OUT/NAME.tb``, the worker's output to ``OUT/NAME.log``),
the table to ``OUT/sweep.md``.
Exports are cached under ``$EXPORT_CACHE`` as the suite's are. Not a test: nothing here runs in CI (the
run of 2026-12-07 took 56 minutes for 50 models on 2 cores, the second list of 20 on 2026-12-08 about
20 minutes); README ("Gradient engine") has its findings.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
LD = ("legacy", "dynamo")
HF = ("legacy-dynamic", "dynamo")
#: name -> (library, constructor, keyword arguments, exporters to try in order)
MODELS = {
    "convnextv2_atto": ("timm", "convnextv2_atto", {}, LD),
    "maxvit_nano_rw_256": ("timm", "maxvit_nano_rw_256", {}, LD),
    "efficientformerv2_s0": ("timm", "efficientformerv2_s0", {}, LD),
    "fastvit_t8": ("timm", "fastvit_t8", {}, LD),
    "mobilenetv4_conv_small": ("timm", "mobilenetv4_conv_small", {}, LD),
    "tiny_vit_5m_224": ("timm", "tiny_vit_5m_224", {}, LD),
    "pvt_v2_b0": ("timm", "pvt_v2_b0", {}, LD),
    "xcit_nano_12_p16_224": ("timm", "xcit_nano_12_p16_224", {}, LD),
    # the legacy exporter fails inside torch on EVA-02's attention (is_causal a tensor): dynamo
    "eva02_tiny_patch14_224": ("timm", "eva02_tiny_patch14_224", {"num_classes": 1000}, LD),
    "vit_small_patch14_dinov2": ("timm", "vit_small_patch14_dinov2",
                                 {"num_classes": 1000, "img_size": 224,
                                  "pretrained_cfg_overlay": {"input_size": (3, 224, 224)}}, LD),
    "crossvit_tiny_240": ("timm", "crossvit_tiny_240", {}, LD),
    "coat_lite_tiny": ("timm", "coat_lite_tiny", {}, LD),
    "gcvit_xxtiny": ("timm", "gcvit_xxtiny", {}, LD),
    "davit_tiny": ("timm", "davit_tiny", {}, LD),
    "focalnet_tiny_srf": ("timm", "focalnet_tiny_srf", {}, LD),
    "inception_v3": ("timm", "inception_v3", {}, LD),
    "res2net50_14w_8s": ("timm", "res2net50_14w_8s", {}, LD),
    "resnest14d": ("timm", "resnest14d", {}, LD),
    "hrnet_w18_small": ("timm", "hrnet_w18_small", {}, LD),
    "mobileone_s0": ("timm", "mobileone_s0", {}, LD),
    "mixer_s16_224": ("timm", "mixer_s16_224", {}, LD),
    "resmlp_12_224": ("timm", "resmlp_12_224", {}, LD),
    "volo_d1_224": ("timm", "volo_d1_224", {}, LD),
    "hiera_tiny_224": ("timm", "hiera_tiny_224", {}, LD),
    "sequencer2d_s": ("timm", "sequencer2d_s", {}, LD),
    "beit_base_d4": ("timm", "beit_base_patch16_224", {"depth": 4}, LD),
    "deit3_small_patch16_224": ("timm", "deit3_small_patch16_224", {}, LD),
    "efficientformer_l1": ("timm", "efficientformer_l1", {}, LD),
    "coatnet_nano_rw_224": ("timm", "coatnet_nano_rw_224", {}, LD),
    "repvit_m0_9": ("timm", "repvit_m0_9", {}, LD),
    "ghostnetv2_100": ("timm", "ghostnetv2_100", {}, LD),
    "hgnetv2_b0": ("timm", "hgnetv2_b0", {}, LD),
    "twins_svt_small": ("timm", "twins_svt_small", {}, LD),
    "inception_next_tiny": ("timm", "inception_next_tiny", {}, LD),
    "dla34": ("timm", "dla34", {}, LD),
    "rexnet_100": ("timm", "rexnet_100", {}, LD),
    "lcnet_050": ("timm", "lcnet_050", {}, LD),
    "repvgg_a0": ("timm", "repvgg_a0", {}, LD),
    "ese_vovnet19b_dw": ("timm", "ese_vovnet19b_dw", {}, LD),
    "nf_regnet_b0": ("timm", "nf_regnet_b0", {}, LD),
    "visformer_tiny": ("timm", "visformer_tiny", {}, LD),
    "starnet_s1": ("timm", "starnet_s1", {}, LD),
    "mambaout_femto": ("timm", "mambaout_femto", {}, LD),
    "rdnet_tiny": ("timm", "rdnet_tiny", {}, LD),
    "vit_relpos_small_patch16_224": ("timm", "vit_relpos_small_patch16_224", {}, LD),
    # the second sweep (2026-12-08): attention by halos, lambdas, bottleneck blocks, RoPE, cascaded groups, ...
    "halonet26t": ("timm", "halonet26t", {}, LD),
    "botnet26t_256": ("timm", "botnet26t_256", {}, LD),
    "lambda_resnet26t": ("timm", "lambda_resnet26t", {}, LD),
    "tresnet_m": ("timm", "tresnet_m", {}, LD),
    "tnt_s_patch16_224": ("timm", "tnt_s_patch16_224", {}, LD),
    "nest_tiny": ("timm", "nest_tiny", {}, LD),
    "convit_tiny": ("timm", "convit_tiny", {}, LD),
    "shvit_s1": ("timm", "shvit_s1", {}, LD),
    "vit_betwixt_patch16_rope_reg4_gap_256": ("timm", "vit_betwixt_patch16_rope_reg4_gap_256", {}, LD),
    "mobilevitv2_050": ("timm", "mobilevitv2_050", {}, LD),
    "efficientvit_m0": ("timm", "efficientvit_m0", {}, LD),
    "skresnet18": ("timm", "skresnet18", {}, LD),
    "fbnetv3_b": ("timm", "fbnetv3_b", {}, LD),
    "pit_ti_224": ("timm", "pit_ti_224", {}, LD),
    "nextvit_small": ("timm", "nextvit_small", {}, LD),
    "fastvit_mci0": ("timm", "fastvit_mci0", {}, LD),
    "vitamin_small_224": ("timm", "vitamin_small_224", {}, LD),
    "mobilenetv5_300m": ("timm", "mobilenetv5_300m", {}, LD),
    "mixnet_s": ("timm", "mixnet_s", {}, LD),
    "dpn68": ("timm", "dpn68", {}, LD),
    "hf_segformer": ("hf", "Segformer", {}, HF),
    "hf_swinv2": ("hf", "Swinv2", dict(image_size=224, patch_size=4, embed_dim=32, depths=[1, 1, 2, 1],
                                        num_heads=[1, 2, 4, 8], window_size=7), HF),
    "hf_cvt": ("hf", "Cvt", {}, HF),
}
COLUMNS = ("export", "load", "gradcam_engine", "recipro_cam_engine", "recipro_cam", "export_explained",
           "reference_target", "scores", "batch", "activations", "gradcam", "occlusion", "lime", "rise",
           "gradient", "guided-backprop", "deep-dream")


# --- the builders: Hugging Face from configs; a zero-initialised head replaced -----------------------

def _rescaled(model, heads, size, generator) -> None:
    """Heads scaled so that the logits spread about 3 (as tests/exports.build does)."""
    import torch

    with torch.no_grad():
        spread = float(model(torch.randn(4, 3, *size, generator=generator)).std())
        for head in heads:
            head.weight.mul_(3.0 / max(spread, 1e-6))
            if head.bias is not None:
                head.bias.mul_(3.0 / max(spread, 1e-6))


def _build_hf(kind: str, kwargs: dict):
    import torch
    import transformers as hf

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    torch.manual_seed(0)
    model = Logits(getattr(hf, f"{kind}ForImageClassification")(getattr(hf, f"{kind}Config")(num_labels=1000, **kwargs)))
    generator = torch.Generator().manual_seed(1)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model.train()  # running statistics of random images, so that BatchNorm does not blow the scores up
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, 224, 224, generator=generator))
    model.eval()
    _rescaled(model, [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000],
              (224, 224), generator)
    return model


def install_builders() -> None:
    """``exports.build`` taught the "hf" library, and to replace a classifier that timm initialises to
    zero (MLP-Mixer, ResMLP, Hiera, Sequencer: every score and gradient 0) by a seeded random one."""
    import exports

    if getattr(exports, "_sweep_builders", False):
        return
    original = exports.build

    def build(family):
        import torch

        library, kind, kwargs = exports.FAMILIES[family]
        model = _build_hf(kind, kwargs) if library == "hf" else original(family)
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
        if heads and all(float(h.weight.detach().abs().max()) == 0 for h in heads):
            generator = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for h in heads:
                    h.weight.copy_(torch.randn(h.weight.shape, generator=generator) * 0.02)
                    if h.bias is not None:
                        h.bias.zero_()
            _rescaled(model, heads, exports.input_size(model), generator)
        return model

    exports.build = build
    exports._sweep_builders = True


# --- one model, in its own process -------------------------------------------------------------------

class Steps:
    """Each step's outcome ("ok[: what]", "FAIL: ..." for a wrong answer, or the exception's type and
    first lines), saved to ``OUT/NAME.json`` after every step."""

    def __init__(self, out: Path, name: str):
        self.path, self.results = out / f"{name}.json", {}
        self.tracebacks = open(out / f"{name}.tb", "w")

    def __call__(self, key: str, fn):
        start = time.perf_counter()
        try:
            value = fn()
            self.results[key] = value if isinstance(value, str) and value.startswith("FAIL") else (
                "ok" if value is None else f"ok: {value}")
            return value
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the sweep goes on
            self.results[key] = f"{type(exc).__module__}.{type(exc).__name__}: " + " / ".join(str(exc).splitlines()[:3])[:400]
            self.tracebacks.write(f"===== {key}\n")
            traceback.print_exc(file=self.tracebacks)
            return None
        finally:
            self.results.setdefault("_seconds", {})[key] = round(time.perf_counter() - start, 1)
            self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1))


def _export(name: str, exporters, step: Steps):
    import exports

    for exporter in exporters:
        def one():
            path = exports.export(name, exporter)
            if not path.is_file():
                raise FileNotFoundError(f"exports.export({name!r}, {exporter!r}) wrote no file")
            return str(path)
        if step(f"export[{exporter}]", one) is not None:
            step.results["exporter"] = exporter
            return exports.export(name, exporter), exporter
    step.results["verdict"] = "export failed (not ours)"
    step.save()
    return None, None


def _export_explained(net, path, image, out: Path, name: str) -> str:
    import numpy as np
    import onnxruntime as ort

    import explainer
    from explainer.methods.gradcam import GradCAM

    written = explainer.export_explained(net, str(out / f"{name}-explained.onnx"), method="gradcam")
    pixels = np.rint(net.prepare([image])[0])
    x = net.to_model_input(pixels)
    source = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    explained = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    feed = {source.get_inputs()[0].name: x}
    got = dict(zip([o.name for o in explained.get_outputs()], explained.run(None, feed)))
    for output, value in zip(source.get_outputs(), source.run(None, feed)):
        if not np.array_equal(got[output.name], value):
            return f"FAIL: the source's output {output.name} differs by {np.abs(got[output.name] - value).max():.3g}"
    reference = GradCAM(net, runs_on="torch").low_resolution(pixels[0], [int(got["saliency_class"][0, 0])])
    error = float(np.abs(got["saliency"][0] - reference).max() / (np.ptp(reference) or 1.0))
    if got["saliency"][0].shape != reference.shape or error > 1e-4:
        return f"FAIL: saliency against the library's torch-path Grad-CAM: {error:.3g} of its range"
    return f"outputs bit-identical, saliency within {error:.1e} of the range"


_PASS_THROUGH = ("Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast", "Gather")


def _dynamo_scopes(model, layer: str) -> list[str]:
    """The source modules the dynamo exporter's node metadata (``pkg.torch.onnx.name_scopes``) puts the
    layer in, deepest first, followed back through the ops that only select or reshape (the layer
    ``node_slice_7`` of VOLO is the top module's slice of ``norm``'s output: ``norm`` first). Empty for
    files without that metadata (the legacy exporter's scopes are in the node names)."""
    import ast

    producers = {o: n for n in model.graph.node for o in n.output}
    producers.update({n.name: n for n in model.graph.node if n.name and n.name not in producers})
    names, tensor = [], layer
    for _ in range(8):
        node = producers.get(tensor)
        if node is None:
            break
        meta = {p.key: p.value for p in node.metadata_props}
        with contextlib.suppress(ValueError, SyntaxError):
            path = [p for p in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))[1:-1] if p]
            names += [".".join(path[:i]) for i in range(len(path), 0, -1) if ".".join(path[:i]) not in names]
        if node.op_type not in _PASS_THROUGH or not node.input:
            break
        tensor = node.input[0]
    return names


def _reference_target(net, name: str, image) -> str:
    """The source module called once whose output equals our default layer's activations (within 1e-3),
    preferring the one named like the layer's ONNX scope; registered as the Grad-CAM reference's target
    (``source_references.TARGETS``)."""
    import numpy as np
    import torch

    import exports
    import explainer
    import source_references

    layer = explainer.gradcam_layers(net)[0]
    layout = net.layout(layer)
    kind = {"CHW": "chw", "HWC": "nhwc", "tokens": "tokens"}[layout.kind]
    # where the source computes the layer channels-last and the graph transposes it back (NesT's final
    # norm on (N, H, W, C), then a permute), the module's output is the layer's values laid out HWC
    tries = ([("tokens", p) for p in (layout.prefix, layout.prefix + 1, layout.prefix + 2)] if kind == "tokens"
             else [(kind, 0), ("nhwc", 0)] if kind == "chw" else [(kind, 0)])
    pixels = np.rint(net.fit_pixels(image)).astype(np.uint8)
    ours = net.activations(pixels, layer).astype(np.float64)
    model = exports.build(name)
    x = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None] / 255.0
    x = (x - torch.tensor(exports.MEAN).view(1, 3, 1, 1)) / torch.tensor(exports.STD).view(1, 3, 1, 1)
    for kind, prefix in tries:
        found, calls = {}, {}
        transform = source_references.reshape_transform(source_references.Target("x", kind, prefix))

        def hook(module_name):
            def record(module, inputs, output):
                calls[module_name] = calls.get(module_name, 0) + 1
                if calls[module_name] > 1 or not torch.is_tensor(output):
                    return
                with contextlib.suppress(Exception):
                    value = transform(output) if transform else output
                    if tuple(value.shape[1:]) == ours.shape:
                        a = value[0].detach().double().numpy()
                        found[module_name] = float(np.abs(a - ours).max() / (np.abs(ours).max() or 1))
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        good = [n for n, e in found.items() if e < 1e-3 and calls[n] == 1]
        if good:
            break
    else:
        raise LookupError(f"no source module (called once) equals our layer {layer!r} ({layout.describe()})")
    scope = []  # legacy scopes: /stages/stages.3/blocks/blocks.1/Add -> stages.3.blocks.1
    for part in layer.strip("/").split("/")[:-1]:
        if scope and part.startswith(scope[-1] + "."):
            scope[-1] = part
        else:
            scope.append(part)
    parts = ".".join(scope).split(".")
    order = [".".join(scope), re.sub(r"_\d+$", "", ".".join(scope))] + [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    # by position in the graph before by value: seeded LayerNorms (weight 1, bias 0) make several modules'
    # outputs equal (timm VOLO's final norm and its class blocks' norm1 on the patch tokens)
    order = _dynamo_scopes(net.model, layer) + order
    module = next((n for n in order if n in good), None) or min(good, key=lambda n: found[n])
    source_references.TARGETS[name] = source_references.Target(module, kind, prefix)
    return f"{module} ({kind}, prefix {prefix})"


def run_one(name: str, out: Path) -> None:
    import numpy as np

    import compat
    import exports
    import explainer

    library, constructor, kwargs, exporters = MODELS[name]
    exports.FAMILIES[name] = (library, constructor, kwargs)
    install_builders()
    step = Steps(out, name)
    path, exporter = _export(name, exporters, step)
    if path is None:
        return
    image = explainer.sample_image("chelsea")
    net = step("load", lambda: explainer.load(str(path), preprocessing="imagenet"))
    if net is None:
        return
    step("gradcam_engine", lambda: explainer.gradcam_engine(net).describe())
    step("recipro_cam_engine", lambda: explainer.recipro_cam_engine(net).describe())

    def recipro():
        m = np.asarray(explainer.recipro_cam(net, image, net.top_k(image, 1)[0].index, verbose=False))
        return "FAIL: not finite" if not np.all(np.isfinite(m)) else f"{m.shape}"
    step("recipro_cam", recipro)
    step("export_explained", lambda: _export_explained(net, path, image, out, name))
    target = step("reference_target", lambda: _reference_target(net, name, image))
    gradient_methods = ("gradcam", "gradient", "guided-backprop", "deep-dream")
    methods = compat.METHODS if target is not None else tuple(m for m in compat.METHODS if m not in gradient_methods)
    with contextlib.redirect_stderr(step.tracebacks):
        for method, outcome in compat.check(name, exporter, "plain", methods).items():
            step.results[method] = "ok" if outcome == "ok" else outcome
    step.results["done"] = True
    step.save()


# --- the sweep ----------------------------------------------------------------------------------------

def _short(value) -> str:
    if value is None:
        return "–"
    value = str(value)
    if value.startswith("ok"):
        return "ok"
    if value.startswith("FAIL") or value.startswith("AssertionError"):
        return "**wrong?**"
    return value.split(":")[0].split(".")[-1]


def table(out: Path, names) -> str:
    rows = ["| model | exporter | " + " | ".join(COLUMNS) + " | s |", "|" + "---|" * (len(COLUMNS) + 3)]
    for name in names:
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        cells = []
        for column in COLUMNS:
            if column == "export":
                cells.append("ok" if r.get("exporter") else ("failed (not ours)" if r.get("verdict") else "–"))
            else:
                cells.append(_short(r.get(column)))
        seconds = sum(r.get("_seconds", {}).values())
        rows.append(f"| {name} | {r.get('exporter') or '–'} | " + " | ".join(cells) +
                    f" | {seconds:.0f}{'' if r.get('done') or r.get('verdict') else ' (stopped)'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), help="these models alone")
    parser.add_argument("--out", default="sweep-results", help="folder for the results")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a model may take")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the worker: one model in this process
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    if args.one:
        run_one(args.one, out)
        return 0
    names = args.only or list(MODELS)
    for k, name in enumerate(names, 1):
        start = time.time()
        try:
            with open(out / f"{name}.log", "w") as log:  # the worker's warnings and prints
                code = subprocess.run([sys.executable, __file__, "--one", name, "--out", str(out)],
                                      timeout=args.timeout, stdout=log, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"[{k}/{len(names)}] {name}: exit {code}, {time.time() - start:.0f} s", flush=True)
    (out / "sweep.md").write_text(table(out, names) + "\n")
    print(f"wrote {out / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
