"""Request fields → what to run: methods from the registry, labels, options under the service's
policy, and the small fields (``k``, ``outputs``, ``alpha``, ``cmap``).

Everything here is checked before a job is queued, so a wrong name or value costs no worker; each
refusal is the library's typed error with a message naming the field (the app answers it 4xx). The
policy the service adds to the methods' own declarations:

* ``verbose`` and ``batch_size`` are the service's to set (silent runs; batch sizes measured once at
  start): a request that sets them is refused;
* seeded methods run with ``random_state=0`` unless the request gives one, so that equal requests get
  equal maps;
* integer options are capped at ``Settings.max_option_value`` (samples, masks, steps, features: the
  memory and time of one request);
* a text value of an option declared by a custom check must be one of the words it declares (quoted in
  its description): values that the library would read as a file path (integrated gradients'
  ``baseline`` image) are refused, since no request may name a file on the server.
"""
from __future__ import annotations

import math
import re

from ..errors import InvalidParameterError, InvalidParameterTypeError
from ..model.labels import LabelSpec
from ..methods.registry import SEED, Custom, Int, Method, get_method

#: options the service sets itself: the value it passes
SERVICE_SET = {"verbose": False}
#: options the service leaves at their default and refuses in requests
SERVICE_OWNED = ("verbose", "batch_size")
OUTPUTS = ("maps", "overlays", "heatmaps")
DEFAULT_OUTPUTS = ("maps", "overlays")


def parse_methods(value) -> list[Method]:
    """Method names (a list, or comma-separated text) → registered methods, aliases resolved, once each."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidParameterTypeError(f"methods: a list of method names is needed; got {value!r}.")
    methods = [get_method(n.strip(), "methods") for n in names if n.strip()]
    if not methods:
        raise InvalidParameterError("methods: at least one method is needed (GET /v1/methods lists them).")
    return list({m.name: m for m in methods}.values())


def parse_labels(value, max_labels: int, net) -> LabelSpec:
    """None (the top class), "topK", class indices or names (a list, or comma-separated text), as
    ``LabelSpec.parse`` reads them; names and indices are checked against ``net``'s classes here (the
    closest names suggested), and at most ``max_labels`` per request."""
    spec = LabelSpec.parse(value, "labels")
    if spec.top is not None and spec.top > max_labels:
        raise InvalidParameterError(f"labels: top{spec.top} asks for {spec.top} classes; the service explains "
                                    f"1 to {max_labels} per request.")
    if len(spec.classes) > max_labels:
        raise InvalidParameterError(f"labels: {len(spec.classes)} classes asked for; the service explains at "
                                    f"most {max_labels} per request.")
    return spec if spec.top is not None else LabelSpec(classes=tuple(spec.indices(net.class_index)))


def parse_options(value, methods: list[Method], max_option_value: int) -> dict[str, dict]:
    """``{method: {option: value}}`` (text values parsed as the CLI's ``--set``) → the options each
    method is called with, under the service's policy; checked against the declarations (without a
    network: layer names are checked by the methods, before any work)."""
    value = {} if value is None else value
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise InvalidParameterTypeError('options: an object {"method": {"option": value}} is needed; got '
                                        f"{str(value)[:200]!r}.")
    wanted = {m.name: m for m in methods}
    out = {m.name: {} for m in methods}
    for name, given in value.items():
        method = get_method(name, "options")
        if method.name not in wanted:
            raise InvalidParameterError(f"options: options are given for method {method.name!r}, which the "
                                        f"request does not ask for ({', '.join(wanted)}).")
        out[method.name].update(_method_options(method, given, max_option_value))
    for method in methods:
        out[method.name] = method.reproducible(out[method.name], verbose=SERVICE_SET["verbose"])
    return out


def _method_options(method: Method, given: dict, max_option_value: int) -> dict:
    where = f"options: {method.name}"
    owned = [k for k in given if k in SERVICE_OWNED and k in method.options]
    if owned:
        raise InvalidParameterError(f"{where}: option {owned[0]!r} is set by the service, not by requests.")
    unknown = {k: v for k, v in given.items() if k not in method.options}
    if unknown:
        method.validate(None, unknown, where)  # raises the registry's message, with the closest names
    parsed = {**given, **method.parse_options({k: v for k, v in given.items() if isinstance(v, str)})}
    for name, value in parsed.items():
        option = method.options[name]
        if isinstance(option, Custom) and isinstance(value, str) and value not in _words(option):
            words = ", ".join(map(repr, _words(option)))
            raise InvalidParameterError(f"{where}: {name} takes no text in the service"
                                        + (f" other than {words}" if words else "") + f"; got {given[name]!r} "
                                        "(requests cannot name files on the server).")
        if isinstance(option, Int) and isinstance(value, int) and not isinstance(value, bool) \
                and value > max_option_value:
            raise InvalidParameterError(f"{where}: {name} must be at most {max_option_value} in this service "
                                        f"(--max-option-value); got {value}.")
    method.validate(None, parsed, where)
    return parsed


def _words(option) -> tuple[str, ...]:
    """The words a custom option declares, quoted in its description ("'superpixels' (SLIC), 'grid' ...")."""
    return tuple(re.findall(r"'([^']+)'", option.describe()))


def parse_outputs(value) -> tuple[str, ...]:
    """Which encodings of each map to return: 'maps', 'overlays', 'heatmaps' (list or comma-separated)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_OUTPUTS
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidParameterTypeError(f"outputs: a list of {', '.join(OUTPUTS)} is needed; got {value!r}.")
    bad = [n for n in names if n not in OUTPUTS]
    if bad:
        raise InvalidParameterError(f"outputs: unknown output {bad[0]!r}; the outputs are {', '.join(OUTPUTS)}.")
    return tuple(dict.fromkeys(names))


def parse_k(value, num_classes: int) -> int:
    """How many classes /v1/classify returns: 1 to the model's class count."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterTypeError(f"k: an integer in [1, {num_classes}] is needed; got {value!r}.")
    if not 1 <= value <= num_classes:
        raise InvalidParameterError(f"k: must be in [1, {num_classes}]; got {value}.")
    return value


def parse_alpha(value) -> float:
    """The overlays' map opacity, in [0, 1]."""
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterTypeError(f"alpha: a number in [0, 1] is needed; got {value!r}.") from None
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise InvalidParameterError(f"alpha: must be in [0, 1]; got {value!r}.")
    return alpha


def parse_cmap(value) -> str:
    """A matplotlib colormap's name (the PNGs' colours)."""
    import matplotlib

    if not isinstance(value, str) or value not in matplotlib.colormaps:
        raise InvalidParameterError(f"cmap: must be a matplotlib colormap name (jet, viridis, ...); got {value!r}.")
    return value


def describe_methods(max_option_value: int) -> list[dict]:
    """The registry's description of every method, as the service runs them: its own options hidden,
    its seed and caps shown."""
    from ..methods.registry import list_methods

    out = []
    for method in list_methods():
        entry = method.as_dict()
        options = []
        for described, option in zip(entry["options"], method.options.values()):
            if option.name in SERVICE_OWNED:
                continue
            if option.name == "random_state":
                described = {**described, "default": SEED,
                             "service": f"the service seeds with {SEED} unless a request gives one"}
            if isinstance(option, Int) and (option.maximum is None or option.maximum > max_option_value):
                described = {**described, "service": f"at most {max_option_value} in this service"}
            options.append(described)
        out.append({**entry, "options": options})
    return out
