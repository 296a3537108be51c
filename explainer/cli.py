"""The ``explainer`` command: a thin argparse layer over the public functions. A user error prints one
line and exits with status 2; never a traceback."""
from __future__ import annotations

import argparse
import sys

from .errors import ExplainerError
from .validation import auto_or_int


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="ONNX file or registry name (default: the embedded EfficientNet-Lite0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--engine", default="onnxruntime", choices=("onnxruntime", "openvino", "auto"),
                   help="runtime of the forward-only methods' passes (openvino: pip install -e '.[openvino]'; "
                        "auto: the faster at f32, measured once)")
    p.add_argument("--precision", default="f32", choices=("f32", "bf16", "f16"),
                   help="bf16/f16: OpenVINO only, faster where the CPU has them, scores about 1e-2 off")


def _load(args):
    from .runtime import load

    return load(args.model, device=args.device, engine=args.engine, precision=args.precision)


def cmd_classify(args) -> int:
    from .samples import resolve

    net = _load(args)
    for image in args.images:
        preds = net.top_k(resolve(image), args.top_k)
        print(f"{image}:")
        for rank, p in enumerate(preds, 1):
            print(f"  {rank}. {p.label:<30} {p.score:.4f}  (class {p.index})")
    return 0


def cmd_layers(args) -> int:
    net = _load(args)
    print(net)
    for layer in net.layers():
        shape = "?" if layer.shape is None else "x".join("?" if d is None else str(d) for d in layer.shape)
        print(f"{layer.name:<50} {layer.op_type:<20} {shape}")
    return 0


def _method_names(text: str) -> list[str]:
    """Method names from a comma-separated list, each checked against the registry before any work."""
    from .methods.registry import get_method

    return [get_method(m.strip(), "--methods").name for m in text.split(",") if m.strip()]


def _method_options(settings) -> dict:
    """{method: {option: value}} from ``--set METHOD.OPTION=VALUE`` texts (values parsed by the
    option's declaration, validated later with everything else)."""
    from .errors import InvalidParameterError
    from .methods.registry import get_method

    out: dict = {}
    for text in settings or ():
        key, sep, value = text.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise InvalidParameterError(f"--set must look like METHOD.OPTION=VALUE (e.g. occlusion.stride=10); "
                                        f"got {text!r}.")
        method = get_method(name.strip(), "--set")
        out.setdefault(method.name, {}).update(method.parse_options({option.strip(): value}))
    return out


def cmd_explain(args) -> int:
    from .report import explain
    from .samples import resolve

    methods = _method_names(args.methods)
    options = _method_options(args.set)
    net = _load(args)
    page = explain(net, resolve(args.image), methods=methods, labels=args.labels, out_dir=args.out,
                   evaluate=not args.no_evaluate, deletion_baseline=args.deletion_baseline, options=options,
                   verbose=not args.quiet)
    print(page)
    return 0


def cmd_methods(args) -> int:
    from .methods.registry import list_methods

    for m in list_methods():
        print(f"{m.name}  ({m.kind}{', also ' + ', '.join(m.aliases) if m.aliases else ''})")
        print(f"    answers: {m.answers}")
        print(f"    cost:    {m.cost}")
        print(f"    tested equal to: {m.reference}")
        for o in m.options.values():
            if o.name != "verbose":
                print(f"    {o.name}={o.default!r}: {o.describe()}" + (f". {o.help}" if o.help else ""))
    return 0


def cmd_walkthrough(args) -> int:
    from .walkthrough import walkthrough

    print(walkthrough(args.out, verbose=not args.quiet, quick=args.quick))
    return 0


def cmd_evaluate(args) -> int:
    from .batch_evaluate import evaluate_folder

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    net = _load(args)
    summary = evaluate_folder(net, args.folder, methods=methods, csv_path=args.csv, steps=args.steps,
                              deletion_baseline=args.deletion_baseline, verbose=not args.quiet)
    print(summary)
    return 0


def cmd_batch(args) -> int:
    from .dataset import explain_dataset
    from .dataset.summary import markdown

    from .export.explained import load_explained

    ray = args.ray is not None
    # a MODEL written by `explainer export` is loaded as the source inside it, with the file as its fast path
    net, inside = load_explained(args.model, device=args.device, engine=args.engine, precision=args.precision,
                                 where="batch")
    summary = explain_dataset(args.source, net, methods=_method_names(args.methods), labels=args.labels,
                              metrics=tuple(m for m in args.metrics.split(",") if m.strip()), out=args.out,
                              engine="ray" if ray else "local", ray_address=(args.ray or None) if ray else None,
                              workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                              resume=not args.no_resume, options=_method_options(args.set), steps=args.steps,
                              deletion_baseline=args.deletion_baseline, path_column=args.path_column,
                              verbose=not args.quiet, model_explained=args.model_explained or inside)
    print(markdown(summary), end="")
    return 0


def cmd_export(args) -> int:
    """``explainer export MODEL --out FILE``: the model with its explanation as extra outputs."""
    from .export import export_explained
    from .runtime import load

    net = load(args.model, device="cpu")
    path = export_explained(net, args.out, method=args.method, feature_layer=args.layer, top_k=args.top_k,
                            map_size=args.map_size)
    print(f"{path}: outputs {', '.join(o.name for o in net.source_model.graph.output)} as the source, plus "
          f"saliency (N, {max(args.top_k, 1)}, h, w) and saliency_class"
          + (" (classes from the input 'target')" if args.top_k == 0 else ""))
    return 0


def _deletion_baseline_arg(p) -> None:
    p.add_argument("--deletion-baseline", default="zero", choices=("zero", "black", "blur", "impute"),
                   help="what removed pixels become in deletion curves: zero (RISE), black, blur, or impute "
                        "(ROAD: from their neighbours, so that the pattern of removed pixels is not itself "
                        "evidence)")


def _methods_help(describe: bool) -> str:
    """The --methods help: the registry's names (read only when help is asked for: importing every
    method costs seconds)."""
    text = "comma-separated method names (explainer methods lists them with their options)"
    if describe:
        from .methods.registry import list_methods

        text += ": " + ", ".join(f"{m.name} ({m.kind})" for m in list_methods())
    return text


def build_parser(describe_methods: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explainer", description="Explain ONNX image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classify", help="print the top-k classes of images")
    p.add_argument("images", nargs="+", help="image files, or sample:NAME (chelsea, coffee, ...)")
    p.add_argument("--top-k", "-k", type=int, default=5)
    _model_arg(p)
    p.set_defaults(func=cmd_classify)
    p = sub.add_parser("layers", help="list the model's layers with op types and shapes")
    _model_arg(p)
    p.set_defaults(func=cmd_layers)
    p = sub.add_parser("explain", help="maps of several methods and labels, as PNGs and an HTML report")
    p.add_argument("image", help="image file, or sample:NAME")
    p.add_argument("--methods", default="gradcam,occlusion,lime,gradient,guided_backprop",
                   help=_methods_help(describe_methods))
    p.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE",
                   help="an option of one method, e.g. occlusion.stride=10 or lime.num_samples=4096 (repeatable)")
    p.add_argument("--labels", default="top3", help="topK, or comma-separated class names or indices")
    p.add_argument("--out", default="explanations", help="output folder")
    p.add_argument("--no-evaluate", action="store_true", help="skip deletion/insertion curves")
    _deletion_baseline_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _model_arg(p)
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("methods", help="list the explanation methods with their options and defaults")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("walkthrough", help="every step of MATLAB's example on the embedded model")
    p.add_argument("--out", default="walkthrough", help="output folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--quick", action="store_true", help="every figure, the detailed deep dream sketched (15 "
                                                         "iterations, 2 levels instead of 100, 4)")
    p.set_defaults(func=cmd_walkthrough)
    p = sub.add_parser("evaluate", help="deletion/insertion AUC per image of a folder (CSV, resumable)")
    p.add_argument("folder")
    p.add_argument("--methods", default="gradcam,occlusion,lime",
                   help=_methods_help(describe_methods) + " (random: the chance level)")
    p.add_argument("--csv", default=None, help="CSV path (default: FOLDER/explainer_evaluation.csv)")
    p.add_argument("--steps", type=int, default=50)
    _deletion_baseline_arg(p)
    p.add_argument("--quiet", action="store_true")
    _model_arg(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("batch", help="explain and score a whole image folder or list: Parquet rows + summary, "
                                     "resumable, locally or on Ray")
    p.add_argument("source", help="a folder (recursive), a .txt/.csv list of paths, or a .parquet/.csv table")
    p.add_argument("--out", required=True, help="output folder (rows/, errors/, summary.json, summary.md)")
    p.add_argument("--methods", default="gradcam", help=_methods_help(describe_methods))
    p.add_argument("--set", action="append", metavar="METHOD.OPTION=VALUE", help="an option of one method (repeatable)")
    p.add_argument("--labels", default="top1", help="topK, or comma-separated class names or indices")
    p.add_argument("--metrics", default="deletion,insertion", help="comma-separated: deletion, insertion ('' for none)")
    p.add_argument("--steps", type=int, default=50, help="points per deletion/insertion curve")
    _deletion_baseline_arg(p)
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray: a cluster's address (ray://host:10001 or host:6379), or none for a local Ray")
    p.add_argument("--workers", type=auto_or_int, default="auto", help="Ray actors (auto: one per node, or one per GPU share)")
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--path-column", default=None, help="the image-path column of a table source")
    p.add_argument("--model-explained", default=None, metavar="FILE",
                   help="a file written by `explainer export` from the model: the rows of its method at its layer "
                        "come from one onnxruntime run of it per image (automatic when --model is such a file)")
    p.add_argument("--no-resume", action="store_true", help="refuse an output folder that holds results")
    p.add_argument("--quiet", action="store_true")
    _model_arg(p)
    p.set_defaults(func=cmd_batch)
    p = sub.add_parser("export", help="write the model with Grad-CAM (or another exportable method) as extra "
                                      "outputs, computed by onnxruntime in the same call")
    p.add_argument("model", help="ONNX file or registry name")
    p.add_argument("--method", default="gradcam", help="gradcam, gradcam_plus_plus, recipro_cam")
    p.add_argument("--out", required=True, help="the ONNX file to write")
    p.add_argument("--layer", default=None, help="the feature layer (default: gradcam_layers(net))")
    p.add_argument("--top-k", type=int, default=1, help="maps of the K best classes; 0: an int64 input 'target'")
    p.add_argument("--map-size", default="feature", choices=("feature", "input"),
                   help="maps at the feature layer's grid, or resized (bicubic) to the input")
    p.set_defaults(func=cmd_export)
    from .serve import cli as serve_cli  # argparse only: the service's own imports wait for run()

    p = sub.add_parser("serve", help="an HTTP service and an interactive page next to the model (FastAPI)")
    serve_cli.add_arguments(p)
    p.set_defaults(func=serve_cli.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(describe_methods=any(a in ("-h", "--help") for a in argv[1:]))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ExplainerError as exc:
        print(f"explainer: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("explainer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
