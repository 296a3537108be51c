"""The method registry: every method declares its name, kind and options once; every option is
validated from its declaration before any work; the report, the CLI and folder evaluation read the
registry."""
import json

import numpy as np
import pytest

import explainer
from explainer.errors import ExplainerError, InvalidParameterError, InvalidParameterTypeError
from explainer.methods import registry
from explainer.methods.registry import FORWARD_ONLY, GRADIENT, KINDS, Int, method


#: the order the built-in methods are listed in (declared by each in its file: ``@method(order=...)``)
BUILT_IN_ORDER = ("gradcam", "gradcam_plus_plus", "score_cam", "occlusion", "lime", "rise", "kernel_shap",
                  "gradient", "guided_backprop", "integrated_gradients", "smoothgrad", "attention_rollout",
                  "attn_lrp", "transformer_attribution", "random")


def test_every_method_module_registers_a_method():
    methods = explainer.list_methods()
    modules = {m.function.__module__.rsplit(".", 1)[1] for m in methods}
    shared = {"gradients", "registry", "deepdream"}  # machinery, and deep dream (not a map of an image)
    assert modules == set(registry.method_modules()) - shared  # one file per method, found by itself
    names = [m.name for m in methods]
    assert [n for n in names if n in BUILT_IN_ORDER] == list(BUILT_IN_ORDER)
    assert names == [m.name for m in sorted(methods, key=lambda m: (m.order is None, m.order or 0, m.name))]
    for m in methods:
        assert m.kind in KINDS and m.answers and m.returns and m.cost and m.reference
        assert m.function is getattr(explainer, m.function.__name__), m.name  # exported at the top level
        assert json.dumps(m.as_dict())  # the service and the CLI list it as plain data
    kinds = {m.name: m.kind for m in methods}
    assert kinds["score_cam"] == kinds["rise"] == kinds["occlusion"] == FORWARD_ONLY
    assert kinds["gradcam_plus_plus"] == kinds["smoothgrad"] == GRADIENT


def _cases():
    for m in explainer.list_methods():
        for option in m.options.values():
            for value in option.invalid():
                yield pytest.param(m.name, option.name, value, id=f"{m.name}-{option.name}={value!r}"[:80])


@pytest.mark.parametrize("name,option,value", list(_cases()))
def test_every_invalid_option_value_is_refused_before_any_work(default_net, name, option, value):
    """The image is not an image: only a check made before any work can answer first."""
    with pytest.raises((InvalidParameterError, InvalidParameterTypeError)) as info:
        explainer.get_method(name)(default_net, object(), 0, **{option: value})
    assert option in str(info.value)


def test_unknown_options_and_methods_name_the_allowed_ones(default_net, chelsea):
    with pytest.raises(InvalidParameterTypeError, match="did you mean stride"):
        explainer.occlusion_sensitivity(default_net, chelsea, 0, strides=10)
    with pytest.raises(InvalidParameterError, match="did you mean score_cam"):
        explainer.get_method("scorecam")
    assert explainer.get_method("guided-backprop").name == "guided_backprop"  # the names before the registry
    assert explainer.get_method("autodiff").name == "gradient"


def test_explainer_exports_what_the_method_files_declare_without_importing_them():
    """``explainer.methods.public_names`` reads the files; importing them registers the same functions."""
    import inspect
    import importlib

    from explainer.methods import public_names

    names = public_names()
    assert {module.split(".")[1] for module in names.values()} <= set(registry.method_modules())
    for m in explainer.list_methods():
        assert names[m.function.__name__] == m.function.__module__.removeprefix("explainer."), m.name
    for name, module in names.items():
        value = getattr(importlib.import_module(f"explainer.{module}"), name)
        assert callable(value) and getattr(explainer, name) is value and name in explainer.__all__
    # twins take their method's options, declared once (the method's signature)
    assert str(inspect.signature(explainer.lime_explanation)).split(" -> ")[0] == \
        str(inspect.signature(explainer.image_lime))
    assert str(inspect.signature(explainer.kernel_shap_explanation)).split(" -> ")[0] == \
        str(inspect.signature(explainer.kernel_shap))


def test_import_explainer_imports_no_method():
    import subprocess
    import sys

    code = ("import sys, explainer; explainer.__all__; dir(explainer); "
            "print(sorted(m for m in sys.modules if m.startswith(('numpy', 'torch', 'explainer.methods.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_declaration_must_match_the_signature():
    with pytest.raises(TypeError, match="differ"):
        @method("broken", kind=FORWARD_ONLY, options={"steps": Int(1)}, answers="-", returns="-", cost="-",
                reference="-")
        def broken(net, image, label, *, stride=1):
            pass
    with pytest.raises(ValueError, match="already registered"):
        @method("gradcam", kind=GRADIENT, options={}, answers="-", returns="-", cost="-", reference="-")
        def again(net, image, label):
            pass


def test_options_parse_from_text():
    occlusion = explainer.get_method("occlusion")
    assert occlusion.parse_options({"stride": "10", "mask_size": "15,10", "mask_clipping": "false"}) == \
        {"stride": 10, "mask_size": (15, 10), "mask_clipping": False}
    assert explainer.get_method("lime").parse_options({"stop_tolerance": "none"}) == {"stop_tolerance": None}
    with pytest.raises(InvalidParameterTypeError, match="unknown option 'strid'"):
        occlusion.parse_options({"strid": "3"})


def test_report_and_cli_take_methods_and_options_from_the_registry(default_net, tmp_path, capsys):
    from explainer.cli import main

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(m.name in listed for m in explainer.list_methods())
    out = tmp_path / "report"
    assert main(["explain", "sample:chelsea", "--methods", "occlusion,score_cam", "--labels", "285", "--out",
                 str(out), "--no-evaluate", "--quiet", "--set", "occlusion.stride=56",
                 "--set", "occlusion.mask_size=56", "--set", "score_cam.feature_layer=/Clip_1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    params = {m["method"]: m["params"] for m in summary["methods"]}
    assert params["occlusion"]["stride"] == [56, 56] and params["score_cam"]["feature_layer"] == "/Clip_1"
    assert main(["explain", "sample:chelsea", "--methods", "occlusion,nope", "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["explain", "sample:chelsea", "--set", "occlusion.stride=0", "--out", str(out)]) == 2
    assert "stride must be" in capsys.readouterr().err


def test_errors_are_the_library_s(default_net, chelsea):
    for m in explainer.list_methods():
        with pytest.raises(ExplainerError):
            m(default_net, chelsea, "no such class")


def test_the_readme_table_is_the_registry():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- methods table")
    table = readme[readme.index("\n", start) + 1:readme.index("<!-- end of methods table -->")]
    assert table == registry.methods_table(), "regenerate README's table: python -m explainer.methods --readme"


def test_random_baseline_is_numpys_generator(default_net, chelsea):
    """The chance-level method draws numpy's generator in order: per pixel, or a grid upsampled."""
    from explainer.methods._common import resize_map

    h, w = chelsea.shape[:2]
    maps = explainer.get_method("random")(default_net, chelsea, [1, 2], random_state=3)
    np.testing.assert_array_equal(maps, np.random.default_rng(3).random((2, h, w)).astype(np.float32))
    smooth = explainer.get_method("random")(default_net, chelsea, 5, cells=7, random_state=3)
    expected = resize_map(np.random.default_rng(3).random((1, 7, 7)).astype(np.float32), (h, w))[0]
    np.testing.assert_array_equal(smooth, expected)
