"""``python -m explainer.methods``: prints the table of methods README.md shows; ``python -m
explainer.methods --readme [README.md]`` rewrites README's table from the registry (tests/test_methods.py
fails while the two differ)."""
from __future__ import annotations

import sys
from pathlib import Path

from .registry import methods_table

START, END = "<!-- methods table", "<!-- end of methods table -->"


def readme_table(text: str) -> tuple[int, int]:
    """[start, end) of the table inside README's text: the lines between the two markers."""
    start = text.index("\n", text.index(START)) + 1
    return start, text.index(END)


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(methods_table())
        return 0
    if argv[0] != "--readme" or len(argv) > 2:
        sys.stderr.write(__doc__ + "\n")
        return 2
    path = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[2] / "README.md")
    text = path.read_text(encoding="utf-8")
    start, end = readme_table(text)
    path.write_text(text[:start] + methods_table() + text[end:], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
