"""How many of the suite's assertions compare against an independent reference (run on demand):

    python tests/count_references.py [TESTS_DIR]

A static count, the same rule before and after a change: an assertion is an ``assert`` statement or a
call of ``numpy.testing.assert_*`` / ``torch.testing.assert_close`` / a helper named ``assert_*``; it counts as *against a reference*
when the function holding it (a test, or a helper of the test modules, such as tests/compat.py's checks)
uses a reference directly or through the helpers of its own module it calls (a test's assertions
include those of the helpers it calls; in modules of helpers, such as compat.py, the public functions
are the roots): Captum, pytorch-grad-cam,
the lime package, scikit-learn, scikit-image's segmentations, a plain onnxruntime session, the source
torch model (tests/exports.py's ``build``, tests/reference.py), an independent model definition. Hand
computed small cases are not detected (undercounted the same way before and after).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REFERENCES = ("captum", "pytorch_grad_cam", "lime_image", "lime_base", "lime.", "sklearn", "slic", "quickshift",
              "felzenszwalb", "InferenceSession", "exports.build", "reference_scores", "_torch_scores",
              "source_references.", "references.", "efficientnet_lite_pytorch", "ActivationsAndGradients", "_reference", "source_model",
              "lxt")


#: modules whose names, imported anywhere in a test module, are references where a function uses them
REFERENCE_MODULES = ("captum", "pytorch_grad_cam", "lime", "sklearn", "skimage.segmentation", "onnxruntime",
                     "efficientnet_lite_pytorch", "source_references", "references", "lxt")


def _imported_references(tree: ast.AST) -> tuple[str, ...]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in REFERENCE_MODULES \
                or isinstance(node, ast.ImportFrom) and node.module == "skimage.segmentation":
            names += [f"{a.asname or a.name}(" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [f"{a.asname or a.name}." for a in node.names if a.name.split(".")[0] in REFERENCE_MODULES]
    return tuple(names)


def _is_assertion(node: ast.AST) -> bool:
    if isinstance(node, ast.Assert):
        return True
    if isinstance(node, ast.Call):
        name = ast.unparse(node.func)
        return (name.startswith(("np.testing.assert", "numpy.testing.assert", "torch.testing.assert"))
                or name.rsplit(".", 1)[-1].startswith("assert_"))  # the tests' own (references.assert_close_in_units)
    return False


def count(root: Path) -> dict:
    total = referenced = 0
    per_file = {}
    for path in sorted([*root.glob("test_*.py"), *root.glob("compat.py"), *root.glob("source_references.py"),
                        *root.glob("frameworks/check.py"), *root.glob("frameworks/test_*.py")]):
        tree = ast.parse(path.read_text())
        functions = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        tokens = REFERENCES + _imported_references(tree)
        direct = {name: any(token in ast.unparse(fn) for token in tokens) for name, fn in functions.items()}

        def own_assertions(fn):
            inner = {id(x) for f in ast.walk(fn) if f is not fn and isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for x in ast.walk(f)}  # nested functions count as their own
            return sum(1 for x in ast.walk(fn) if id(x) not in inner and _is_assertion(x))

        def reach(name, seen):
            """``name`` and the functions of this module it calls, transitively."""
            seen.add(name)
            for c in ast.walk(functions[name]):
                if isinstance(c, ast.Call):
                    callee = ast.unparse(c.func)
                    if callee in functions and callee not in seen:
                        reach(callee, seen)
            for c in ast.walk(functions[name]):  # functions passed as values (run("x", lambda: _check(...)))
                if isinstance(c, ast.Name) and c.id in functions and c.id not in seen:
                    reach(c.id, seen)
            return seen

        is_test = path.name.startswith("test_")
        roots = [n for n in functions if (n.startswith("test_") if is_test else not n.startswith("_"))]
        n = r = 0
        for name in roots:
            reached = reach(name, set())
            a = sum(own_assertions(functions[f]) for f in reached)
            n += a
            r += a if any(direct[f] for f in reached) else 0
        per_file[str(path.relative_to(root))] = (n, r)
        total, referenced = total + n, referenced + r
    return dict(assertions=total, against_references=referenced, files=per_file)


if __name__ == "__main__":
    result = count(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
    for name, (n, r) in result["files"].items():
        print(f"{name:40s} {n:4d} assertions, {r:4d} against references")
    print(f"total: {result['assertions']} assertions, {result['against_references']} against independent references")
