"""The method registry: every explanation method declares once what it is.

A method is a public function ``fn(net, image, label, *, options...)`` in its own file, decorated with
``@method(name, kind=..., options={...}, order=..., ...)``. Its defaults are the function's keyword
defaults; the declaration adds each option's constraint (an ``Option``), what the method answers, what
it costs, what it is tested equal to and where it stands in lists (``order``). The decorator refuses a
declaration that does not match the signature, and the function it returns validates every option from
the declarations before any work, so a method never checks its own options. The plumbing around a
method's idea (images and labels in, maps out) is ``_common.MapMethod``'s.

Adding a method is adding its file (and its test): nothing else lists it. The report, the CLI, folder
evaluation, the dataset job and the service find methods here (``list_methods``, ``get_method``);
``explainer/__init__.py`` exports each method's function, its twins (``@twin_of``) and the functions
marked ``@public`` by reading the files (``explainer.methods.public_names``, no import); README's table
is ``methods_table()`` (``python -m explainer.methods --readme`` rewrites it; a test keeps it equal).

The library's three registries (these methods, ``convert.passes`` and ``convert.converters``) follow
one rule (``explainer.registries``): the modules of the registry's package are found by one ``pkgutil``
scan and imported (those whose names start with "_" excepted); a decorator registers each entry as its
module is imported; a second entry of the same name raises ``ValueError`` naming both places.
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import InvalidParameterError, InvalidParameterTypeError
from ..registries import duplicate, import_modules, place
from ..validation import check_batch_size, check_choice, check_float, check_int, closest, refuse

FORWARD_ONLY, GRADIENT = "forward-only", "gradient"

if TYPE_CHECKING:
    from ..runtime.classifier import Classifier
#: the seed of seeded methods where the caller gives none (``Method.reproducible``)
SEED = 0
KINDS = (FORWARD_ONLY, GRADIENT)


# options ------------------------------------------------------------------------------------------
class Option:
    """One keyword option of a method: a constraint with a description, a parser for text (CLI, HTTP
    forms) and values the constraint refuses (for the shared test). ``name`` and ``default`` come from
    the function's signature when the method is registered."""

    name: str = ""
    default: Any = None

    def __init__(self, help: str = ""):
        self.help = help

    def bind(self, name: str, default) -> "Option":
        bound = copy.copy(self)
        bound.name, bound.default = name, default
        return bound

    def check(self, where: str, value, net=None):
        """The value, validated (and normalised); raises the library's typed error otherwise."""
        return value

    def describe(self) -> str:
        return "any value"

    def parse(self, text: str):
        """A value from its text form ('auto', '12', '0.5', 'true', '15,10', 'none')."""
        return _parse_scalar(text)

    def invalid(self) -> list:
        return []

    def as_dict(self) -> dict:
        default = self.default if isinstance(self.default, (str, int, float, bool, type(None))) else repr(self.default)
        return {"name": self.name, "default": default, "allowed": self.describe(), "help": self.help}


def _parse_scalar(text: str):
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(_parse_scalar(part) for part in text.split(","))
    return text.strip()


class Int(Option):
    def __init__(self, minimum=None, maximum=None, help: str = ""):
        super().__init__(help)
        self.minimum, self.maximum = minimum, maximum

    def describe(self) -> str:
        return (f"an integer in [{self.minimum if self.minimum is not None else '-inf'}, "
                f"{self.maximum if self.maximum is not None else 'inf'}]")

    def check(self, where, value, net=None):
        return check_int(where, self.name, value, minimum=self.minimum, maximum=self.maximum)

    def invalid(self) -> list:
        out = [1.5, "many", True]
        if self.minimum is not None:
            out.append(self.minimum - 1)
        if self.maximum is not None:
            out.append(self.maximum + 1)
        return out


class Float(Option):
    def __init__(self, minimum=None, maximum=None, min_inclusive: bool = True, help: str = ""):
        super().__init__(help)
        self.minimum, self.maximum, self.min_inclusive = minimum, maximum, min_inclusive

    def describe(self) -> str:
        return (f"a number in {'[' if self.min_inclusive else '('}{self.minimum if self.minimum is not None else '-inf'}, "
                f"{self.maximum if self.maximum is not None else 'inf'}]")

    def check(self, where, value, net=None):
        return check_float(where, self.name, value, minimum=self.minimum, maximum=self.maximum,
                           min_inclusive=self.min_inclusive)

    def invalid(self) -> list:
        out = ["high", float("nan"), None]
        if self.minimum is not None:
            out.append(self.minimum - 1 if self.min_inclusive else self.minimum)
        if self.maximum is not None:
            out.append(self.maximum + 1)
        return out


class Optional(Option):
    """None, or what ``inner`` allows."""

    def __init__(self, inner: Option, help: str = ""):
        super().__init__(help or inner.help)
        self.inner = inner

    def bind(self, name, default):
        bound = super().bind(name, default)
        bound.inner = self.inner.bind(name, default)
        return bound

    def describe(self) -> str:
        return f"None or {self.inner.describe()}"

    def check(self, where, value, net=None):
        return None if value is None else self.inner.check(where, value, net)

    def invalid(self) -> list:
        return [v for v in self.inner.invalid() if v is not None]


class Choice(Option):
    def __init__(self, choices: Sequence[str], help: str = ""):
        super().__init__(help)
        self.choices = tuple(choices)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def check(self, where, value, net=None):
        return check_choice(where, self.name, value, self.choices)

    def parse(self, text: str):
        return text.strip()

    def invalid(self) -> list:
        return ["no-such-choice", 3]


class Flag(Option):
    def describe(self) -> str:
        return "True or False"

    def check(self, where, value, net=None):
        if not isinstance(value, (bool, np.bool_)):
            refuse(where, self.name, self.describe(), value, type_error=True)
        return bool(value)

    def invalid(self) -> list:
        return ["yes", 2]


class Seed(Option):
    def describe(self) -> str:
        return "None or an integer (the seed: equal seeds give equal maps)"

    def check(self, where, value, net=None):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            refuse(where, self.name, "None or an integer", value, type_error=True)
        if value is not None and not 0 <= int(value) < 2 ** 32:
            refuse(where, self.name, "None or an integer in [0, 2**32)", value)
        return None if value is None else int(value)

    def invalid(self) -> list:
        return [1.5, "seed", -1]


class BatchSize(Option):
    def describe(self) -> str:
        return "'auto' or an integer in [1, 65536]"

    def check(self, where, value, net=None):
        return check_batch_size(where, value)

    def invalid(self) -> list:
        return ["fast", 0, 2.5]


class Size(Option):
    """'auto', a positive integer (the same for height and width) or a (height, width) pair."""

    def describe(self) -> str:
        return "'auto', a positive integer or a (height, width) pair of them"

    def check(self, where, value, net=None):
        if isinstance(value, str):
            if value != "auto":
                refuse(where, self.name, self.describe(), value)
            return value
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = (value, value)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            refuse(where, self.name, self.describe(), value, type_error=True)
        return tuple(check_int(where, self.name, v, minimum=1) for v in value)

    def invalid(self) -> list:
        return ["big", 0, (3, 0), (1, 2, 3), 2.5]


class PixelValue(Option):
    """A fill colour: one of ``words`` ('auto': the image's mean colour), or pixel values 0..255 (one,
    or one per channel)."""

    def __init__(self, words: Sequence[str] = ("auto",), help: str = ""):
        super().__init__(help)
        self.words = tuple(words)

    def describe(self) -> str:
        return " or ".join(repr(w) for w in self.words) + " or pixel values in 0..255 (one, or one per channel)"

    def check(self, where, value, net=None):
        if isinstance(value, str):
            if value not in self.words:
                refuse(where, self.name, self.describe(), value)
            return value
        try:
            array = np.atleast_1d(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError):
            refuse(where, self.name, self.describe(), value, type_error=True)
        channels = net.input.channels if net is not None else 3
        if array.ndim != 1 or len(array) not in (1, channels) or not np.all((array >= 0) & (array <= 255)):
            refuse(where, self.name, self.describe(), value)
        return array

    def invalid(self) -> list:
        return ["grey", -1, 300, (1, 2, 3, 4, 5)]


class LayerName(Option):
    """None (the method's default layer) or the name of a layer of the network."""

    def describe(self) -> str:
        return "None (the default layer) or a layer name (net.layers() lists them)"

    def check(self, where, value, net=None):
        if value is None:
            return None
        if not isinstance(value, str):
            refuse(where, self.name, self.describe(), value, type_error=True)
        if net is not None:
            from ..errors import UnknownLayerError

            try:
                net.layer(value)
            except UnknownLayerError as exc:  # with the closest names
                raise UnknownLayerError(f"{where}: {self.name}: {exc}") from None
        return value

    def invalid(self) -> list:
        return [3, "no such layer"]


class Custom(Option):
    """A constraint too particular for the types above: ``check(where, name, value, net)`` returns the
    value or raises; ``describe`` and ``invalid`` given with it."""

    def __init__(self, check: Callable, describe: str, invalid: Sequence = (), help: str = ""):
        super().__init__(help)
        self._check, self._describe, self._invalid = check, describe, list(invalid)

    def describe(self) -> str:
        return self._describe

    def check(self, where, value, net=None):
        return self._check(where, self.name, value, net)

    def invalid(self) -> list:
        return list(self._invalid)


# methods ------------------------------------------------------------------------------------------
@dataclass
class Method:
    """One explanation method: ``method(net, image, label, **options)`` gives its maps, float32 (H, W)
    for one label or (K, H, W) for several, a stacked or listed map per image for a batch."""

    name: str
    kind: str
    function: Callable
    options: dict[str, Option]
    answers: str
    returns: str
    cost: str
    reference: str
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)
    #: where the method stands in lists (``list_methods``, README's table): lower first; None: after
    #: every ordered method, by name
    order: float | None = None

    @property
    def seeded(self) -> bool:
        return "random_state" in self.options

    def reproducible(self, options: dict, verbose: bool | None = None) -> dict:
        """The options as a report, an audit or the service run them: a seeded method gets
        ``random_state=SEED`` unless one is given (equal runs give equal maps), and ``verbose``, when
        given and the method declares it, is set."""
        out = dict(options)
        if self.seeded:
            out.setdefault("random_state", SEED)
        if verbose is not None and "verbose" in self.options:
            out["verbose"] = verbose
        return out

    def defaults(self) -> dict:
        return {name: option.default for name, option in self.options.items()}

    def validate(self, net, options: dict, where: str | None = None) -> dict:
        """Every option (given ones and defaults) checked and normalised; unknown names refused."""
        where = where or self.function.__name__
        unknown = [k for k in options if k not in self.options]
        if unknown:
            near = closest(unknown[0], self.options)
            raise InvalidParameterTypeError(
                f"{where}: unknown option {unknown[0]!r} for method {self.name!r}"
                + (f" (did you mean {', '.join(near)}?)" if near else "")
                + f"; its options are {', '.join(self.options) or 'none'}.")
        values = {**self.defaults(), **options}
        return {name: self.options[name].check(where, values[name], net) for name in self.options}

    def parse_options(self, texts: dict[str, str]) -> dict:
        """Option values from text (CLI ``--set``, HTTP forms), not yet validated."""
        unknown = [k for k in texts if k not in self.options]
        if unknown:
            self.validate(None, {k: None for k in unknown})  # raises the unknown-option message
        return {k: self.options[k].parse(v) for k, v in texts.items()}

    def __call__(self, net, image, label, **options):
        return self.function(net, image, label, **options)

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "function": f"explainer.{self.function.__name__}"
                if self.function.__name__ in _public_names() else self.function.__module__ + "." + self.function.__name__,
                "answers": self.answers, "returns": self.returns, "cost": self.cost, "reference": self.reference,
                "aliases": list(self.aliases), "options": [o.as_dict() for o in self.options.values()]}


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def _public_names() -> set[str]:
    import explainer

    return set(getattr(explainer, "__all__", ()))


def method(name: str, *, kind: str, options: dict[str, Option], answers: str, returns: str, cost: str,
           reference: str, aliases: Sequence[str] = (), order: float | None = None):
    """Register the decorated public function as the method ``name``. ``options`` must name exactly
    the function's keyword-only arguments; their defaults are read from the signature. The returned
    function validates its options from the declarations before it runs. ``order``: where the method
    stands in lists (lower first; None: after the ordered ones, by name)."""
    if kind not in KINDS:
        raise ValueError(f"method {name!r}: kind must be one of {KINDS}; got {kind!r}")

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        keywords = {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
        if set(keywords) != set(options):
            raise TypeError(f"method {name!r}: declared options {sorted(options)} differ from the keyword "
                            f"arguments of {fn.__name__}: {sorted(keywords)}")
        for new in (name, *aliases):
            if new in _METHODS or new in _ALIASES:
                first = _METHODS[_ALIASES.get(new, new)]
                raise duplicate(f"a method (or alias) named {new!r}", place(first.function), place(fn))
        bound = {k: options[k].bind(k, keywords[k]) for k in keywords}

        @functools.wraps(fn)
        def validated(net: Classifier, image, label, **given):
            return fn(net, image, label, **entry.validate(net, given, fn.__name__))

        entry = Method(name, kind, validated, bound, answers, returns, cost, reference, tuple(aliases), order=order)
        validated.method = entry
        validated.unchecked = fn  # for callers that validated already (e.g. a dispatcher)
        _METHODS[name] = entry
        for alias in aliases:
            _ALIASES[alias] = name
        return validated

    return wrap


def twin_of(declared: Callable):
    """Decorator for a twin of the registered method ``declared``: ``fn(net, image, label, **options)``
    (one that returns everything the method computed, say, not only its maps) takes the method's options
    as they are declared once, in the method's signature: its own signature is the method's (return
    annotation aside), and the options are validated by the method's declarations, with ``fn``'s name
    in messages, before ``fn`` runs. ``explainer`` exports it beside the method."""
    entry = declared.method

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def validated(net: Classifier, image, label, **given):
            return fn(net, image, label, **entry.validate(net, given, fn.__name__))

        validated.__signature__ = inspect.signature(declared).replace(
            return_annotation=inspect.signature(fn).return_annotation)
        return validated

    return wrap


def public(fn: Callable) -> Callable:
    """Marks a function of a method's file that ``explainer`` exports though it is no method (e.g.
    ``gradcam_layers``); ``explainer.methods.public_names`` finds the mark in the file's text."""
    return fn


def method_modules() -> list[str]:
    """The modules of this folder (private ones, starting with "_", excluded): each may define methods."""
    from pathlib import Path

    from ..registries import modules

    return modules(Path(__file__).parent)


def _load_all() -> None:
    """Imports every method module once, so that each registers its methods: adding a method is adding
    one file."""
    global _LOADED
    if not _LOADED:
        import_modules(__package__, method_modules())
        _LOADED = True


_LOADED = False


def _rank(m: Method) -> tuple:
    return (m.order is None, m.order or 0, m.name)


def list_methods() -> list[Method]:
    """Every registered explanation method, by their declared ``order`` (then unordered ones by name)."""
    _load_all()
    return sorted(_METHODS.values(), key=_rank)


def method_names() -> list[str]:
    return [m.name for m in list_methods()]


def get_method(name: str, where: str = "method") -> Method:
    """The method called ``name`` (or one of its aliases); an unknown name lists the known ones."""
    _load_all()
    if isinstance(name, str):
        name = _ALIASES.get(name, name)
        if name in _METHODS:
            return _METHODS[name]
    near = closest(name, list(_METHODS) + list(_ALIASES)) if isinstance(name, str) else []
    raise InvalidParameterError(
        f"{where}: unknown method {name!r}" + (f" (did you mean {', '.join(near)}?)" if near else "")
        + f"; the methods are {', '.join(_METHODS)}.")


def methods_table() -> str:
    """The README's table of methods, made from the declarations (a test keeps the two equal)."""
    lines = ["| method | function | kind | answers | cost | tested equal to |", "| --- | --- | --- | --- | --- | --- |"]
    for m in list_methods():
        lines.append(f"| `{m.name}` | `{m.function.__name__}` | {m.kind} | {m.answers} | {m.cost} | {m.reference} |")
    return "\n".join(lines) + "\n"
