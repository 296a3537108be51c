"""``explainer serve``: the arguments and the runner, for the main command line to wire up.

Only the standard library is imported here at module level, so that ``explainer --help`` stays fast;
FastAPI, uvicorn and the model are imported by ``run``.
"""
from __future__ import annotations

import argparse
import os

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``explainer serve``."""
    from ..validation import auto_or_int
    parser.add_argument("model", nargs="?", default=None,
                        help="ONNX file or registry name (default: the embedded EfficientNet-Lite0)")
    parser.add_argument("--model-explained", default=None, metavar="FILE",
                        help="a file written by `explainer export` from MODEL: explain requests for its method "
                             "at its layer are answered by one onnxruntime run of it (prediction and maps); "
                             "other requests as usual. Automatic when MODEL itself is such a file")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only; 0.0.0.0 in a container, with --token "
                             "or behind an authenticating proxy)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--token", default=None,
                        help="bearer token every /v1 request must send (Authorization: Bearer T); default: "
                             "the EXPLAINER_SERVE_TOKEN environment variable, else none")
    parser.add_argument("--workers", type=auto_or_int, default="auto",
                        help="requests worked on at once (default auto: one per available core)")
    parser.add_argument("--queue", type=auto_or_int, default="auto",
                        help="requests that may wait for a worker; more get 503 with Retry-After (default "
                             "auto: 4 per worker)")
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="seconds one request may take, waiting included; then 503 and its work is "
                             "cancelled (default 120)")
    parser.add_argument("--max-body-bytes", type=int, default=20 << 20, help="largest request body (default 20 MiB)")
    parser.add_argument("--max-pixels", type=int, default=16_000_000,
                        help="largest image decoded, width x height (default 16 million)")
    parser.add_argument("--max-labels", type=int, default=10, help="most classes per explain request (default 10)")
    parser.add_argument("--max-option-value", type=int, default=10_000,
                        help="largest value of integer options: samples, masks, steps (default 10000)")
    parser.add_argument("--max-output-pixels", type=int, default=40_000_000,
                        help="most map pixels per explain answer, maps x image pixels (default 40 million)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--engine", default="onnxruntime", choices=("onnxruntime", "openvino", "auto"),
                        help="runtime of the forward-only methods' passes (openvino: pip install -e "
                             "'.[openvino]'; auto: the faster at f32, measured once)")
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16", "f16"),
                        help="bf16/f16: OpenVINO only, faster where the CPU has them, scores about 1e-2 off")
    parser.add_argument("--root-path", default="",
                        help="the path prefix a reverse proxy serves this under (e.g. /explainer)")
    parser.add_argument("--forwarded-allow-ips", default=None,
                        help="proxies trusted for X-Forwarded-For/-Proto (uvicorn's; default 127.0.0.1)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def settings_from(args):
    """``Settings`` from parsed arguments (the token from the environment when not given)."""
    from .settings import TOKEN_ENV, Settings

    return Settings(workers=args.workers, queue=args.queue, time_limit=args.time_limit,
                    max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels, max_labels=args.max_labels,
                    max_option_value=args.max_option_value, max_output_pixels=args.max_output_pixels,
                    token=args.token or os.environ.get(TOKEN_ENV) or None)


def run(args) -> int:
    """Load the model, build the app and serve it until SIGINT/SIGTERM (then finish in-flight requests)."""
    import logging

    from explainer.errors import ExplainerError

    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ExplainerError(f"explainer serve needs its extra ({exc}): pip install 'onnx-explainer[serve]'") from None

    settings = settings_from(args)
    _configure_logging(args.log_level)
    log = logging.getLogger("explainer.serve")
    if args.host not in LOOPBACK and settings.token is None:
        log.warning("binding %s without a token: anyone who reaches this address can use the service "
                    "(use --token, or an authenticating reverse proxy)", args.host)
    from ..export.explained import load_explained

    net, explained = load_explained(args.model, device=args.device, engine=args.engine, precision=args.precision,
                                    where="serve")
    if args.model_explained is not None:
        from ..export.explained import ExplainedModel

        explained = ExplainedModel.open(args.model_explained, net, "--model-explained")
    if explained is not None:
        log.info("explain requests for %s at layer %r run on %s (one onnxruntime call each)", explained.method,
                 explained.layer, explained.name)
    app = create_app(net, settings, explained=explained)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, access_log=False, log_level=args.log_level,
        root_path=args.root_path, timeout_graceful_shutdown=int(settings.time_limit) + 5,
        limit_concurrency=max(64, 8 * settings.admitted), timeout_keep_alive=5,
        **({"forwarded_allow_ips": args.forwarded_allow_ips} if args.forwarded_allow_ips else {}))
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def _configure_logging(level: str) -> None:
    """The service's logs as JSON lines on stderr (the access log's lines are JSON already)."""
    import json
    import logging
    import sys
    from datetime import datetime, timezone

    class JsonLines(logging.Formatter):
        def format(self, record):
            message = record.getMessage()
            if record.name == "explainer.serve.access":
                return message
            out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                   "event": "log", "level": record.levelname.lower(), "logger": record.name, "message": message}
            if record.exc_info:
                out["exception"] = self.formatException(record.exc_info)
            return json.dumps(out)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("explainer")
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper()))
    logger.propagate = False
    logging.getLogger("explainer.serve.access").setLevel(logging.INFO)  # the access log, whatever the level
