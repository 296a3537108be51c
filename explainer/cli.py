"""The ``explainer`` command: a thin argparse layer over the public functions. A user error prints one
line and exits with status 2; never a traceback."""
from __future__ import annotations

import argparse
import sys

from .errors import ExplainerError


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="ONNX file or registry name (default: the embedded EfficientNet-Lite0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _load(args):
    from . import load

    return load(args.model, device=args.device)


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


def cmd_explain(args) -> int:
    from .report import explain
    from .samples import resolve

    net = _load(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    page = explain(net, resolve(args.image), methods=methods, labels=args.labels, out_dir=args.out,
                   evaluate=not args.no_evaluate, deletion_baseline=args.deletion_baseline, verbose=not args.quiet)
    print(page)
    return 0


def cmd_walkthrough(args) -> int:
    from .walkthrough import walkthrough

    print(walkthrough(args.out, verbose=not args.quiet))
    return 0


def cmd_evaluate(args) -> int:
    from .batch_evaluate import evaluate_folder

    net = _load(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summary = evaluate_folder(net, args.folder, methods=methods, csv_path=args.csv, steps=args.steps,
                              deletion_baseline=args.deletion_baseline, verbose=not args.quiet)
    print(summary)
    return 0


def _deletion_baseline_arg(p) -> None:
    p.add_argument("--deletion-baseline", default="zero", choices=("zero", "black", "blur", "impute"),
                   help="what removed pixels become in deletion curves: zero (RISE), black, blur, or impute "
                        "(ROAD: from their neighbours, so that the pattern of removed pixels is not itself "
                        "evidence)")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--methods", default="gradcam,occlusion,lime,gradient,guided-backprop",
                   help="comma-separated: gradcam, occlusion, lime, gradient, guided-backprop, "
                        "integrated-gradients, smoothgrad")
    p.add_argument("--labels", default="top3", help="topK, or comma-separated class names or indices")
    p.add_argument("--out", default="explanations", help="output folder")
    p.add_argument("--no-evaluate", action="store_true", help="skip deletion/insertion curves")
    _deletion_baseline_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _model_arg(p)
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("walkthrough", help="every step of MATLAB's example on the embedded model")
    p.add_argument("--out", default="walkthrough", help="output folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_walkthrough)
    p = sub.add_parser("evaluate", help="deletion/insertion AUC per image of a folder (CSV, resumable)")
    p.add_argument("folder")
    p.add_argument("--methods", default="gradcam,occlusion,lime")
    p.add_argument("--csv", default=None, help="CSV path (default: FOLDER/explainer_evaluation.csv)")
    p.add_argument("--steps", type=int, default=50)
    _deletion_baseline_arg(p)
    p.add_argument("--quiet", action="store_true")
    _model_arg(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
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
