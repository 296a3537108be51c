"""``python -m explainer.serve [MODEL] [options]``: the same as ``explainer serve``."""
from __future__ import annotations

import argparse
import sys

from .cli import add_arguments, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m explainer.serve", description="Serve explanations over HTTP.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ..errors import ExplainerError

    try:
        return run(args)
    except ExplainerError as exc:
        print(f"explainer serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
