"""AttnLRP's rules on a converted module, in the gradient x input form (lxt's "efficient" implementation:
Arras et al. 2025; Achtibat et al., ICML 2024): the forward pass is unchanged, the backward pass is
modified at a few operations so that, at every tensor t, ``t * dscore/dt`` is t's LRP relevance.

The rules, found from the converted module's data flow (which tensors the image's values reach), never
from op names alone:

- **uniform rule** (products of image-dependent tensors: Q·K^T and A·V, any MatMul or Einsum of two or
  more image-dependent operands, an elementwise Mul of two that are not one activation): the gradient at
  the product is divided by the number of image-dependent operands, so each gets an equal share;
- **identity rule** (elementwise non-linear activations: Gelu, Erf, Tanh, Sigmoid, Relu, ...; and a
  gated unit x·f(x) written out, such as the exporters' GELU ``x * 0.5 * (1 + Erf(x / sqrt 2))`` or
  SiLU ``x * Sigmoid(x)``: both factors elementwise functions of one tensor x): relevance passes
  unchanged, gradient f(x)/x at x;
- **LN rule** (layer norms, as LayerNormalization or written out; any division by an image-dependent
  tensor, and a multiplication by a factor computed through a reduction, as normalisations do): the
  deviation is a constant (detached), the centring by the mean stays a linear map;
- **softmax rule** (AttnLRP's Proposition 3.1: R_in = x (R_out - s Σ R_out)): the plain gradient, which
  is that rule in this form;
- **epsilon rule** (MatMul/Gemm/Conv with constant weights, additions, means, layout ops): the plain
  gradient (ε = 0, as lxt's efficient form); so also talking-heads attention's mixing of the heads
  before and after the softmax (CaiT: a constant heads x heads matrix).

Biases absorb relevance (the share b·dscore/db of every constant added: linear and conv biases, the
class token and positional embeddings, layer norms' shifts), and so does the softmax rule (what
R_in = x (R_out - s Σ R_out) does not pass on: the Taylor expansion's remainder, which lxt's
``softmax_fn`` leaves undistributed): the input relevance sums to the score less those;
``relevance(..., account=True)`` measures each, and they add up to the score.

A graph that normalises its own pixels ((x - mean) / std at its start) would lose the mean's share
to that subtraction, and a black pixel would have no relevance at all; so the relevance is read where
that normalisation ends (``Plan.entry``) and carried back to the input through its Transposes only.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

#: through these only a tensor's shape flows, not its values (as ``explainer.model.structure``)
NO_VALUE_FLOW = frozenset({"Shape", "Size", "ConstantOfShape", "EyeLike"})
#: elementwise non-linear activations: the identity rule
ACTIVATIONS = frozenset({"Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "LeakyRelu", "Elu", "Selu", "Celu",
                         "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu",
                         "PRelu", "Clip"})
#: elementwise ops of one tensor (with constants): followed back to find a gated unit's common input
_UNARY = ACTIVATIONS | frozenset({"Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Pow", "Cast",
                                  "Identity", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign"})
_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})
_PRODUCTS = frozenset({"MatMul", "Einsum"})
#: a normaliser's factor is computed from its input through one of these
_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceL2", "ReduceSumSquare", "ReduceL1",
                         "GlobalAveragePool", "LpNormalization"})
_LAYER_NORMS = frozenset({"LayerNormalization"})
_LAYOUT = frozenset({"Expand", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Cast", "Identity", "Tile",
                     "Flatten"})


def _torch():
    import torch

    return torch


# the rules' backward passes -----------------------------------------------------------------------
def _functions():
    torch = _torch()

    class Divide(torch.autograd.Function):
        """Identity forward; the gradient divided by ``factor`` (the uniform rule)."""

        @staticmethod
        def forward(ctx, x, factor):
            ctx.factor = factor
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g / ctx.factor, None

    class Identity(torch.autograd.Function):
        """``out`` = f(x) forward; gradient f(x)/x to x and none through f (the identity rule:
        x * gradient = f(x) * gradient at the output)."""

        @staticmethod
        def forward(ctx, x, out):
            ctx.shape = x.shape
            nonzero = x != 0
            ctx.save_for_backward(torch.where(nonzero, out / torch.where(nonzero, x, torch.ones_like(x)),
                                              torch.zeros_like(x)))
            return out.view_as(out)

        @staticmethod
        def backward(ctx, g):
            ratio, = ctx.saved_tensors
            return _sum_to(ratio * g, ctx.shape), None

    class Watch(torch.autograd.Function):
        """Identity; adds sum(x * gradient) (over the whole tensor: Swin folds windows into the batch) to
        ``into[key]`` in backward (the accounting, for one image and one label)."""

        @staticmethod
        def forward(ctx, x, into, key):
            ctx.save_for_backward(x)
            ctx.into, ctx.key = into, key
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            x, = ctx.saved_tensors
            ctx.into[ctx.key] = ctx.into.get(ctx.key, 0.0) + float((x * g).double().sum())
            return g, None, None

    class Record(torch.autograd.Function):
        """Identity; keeps ``x * gradient`` in ``into`` (at the place it had in forward order)."""

        @staticmethod
        def forward(ctx, x, into):
            ctx.save_for_backward(x)
            ctx.into, ctx.index = into, len(into)
            into.append(None)
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            x, = ctx.saved_tensors
            ctx.into[ctx.index] = (x * g).detach()
            return g, None

    return Divide, Identity, Watch, Record


def _sum_to(t, shape):
    return t if tuple(t.shape) == tuple(shape) else t.sum_to_size(shape)


_FUNCTIONS = None


def functions():
    """(Divide, Identity, Watch, Record) autograd functions, made on first use (torch imported lazily)."""
    global _FUNCTIONS
    if _FUNCTIONS is None:
        _FUNCTIONS = _functions()
    return _FUNCTIONS


def divide_gradient(x, factor):
    return functions()[0].apply(x, factor)


def identity_rule(x, out):
    return functions()[1].apply(x, out)


def layer_norm_rule(x, dims, eps, scale=None, bias=None):
    """A layer norm over ``dims`` with its deviation detached (AttnLRP's LN rule, lxt's
    ``layer_norm_forward``)."""
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    std = (centred.pow(2).mean(dim=dims, keepdim=True) + eps).sqrt().detach()
    y = centred / std
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


# where the rules go -------------------------------------------------------------------------------
@dataclass
class Plan:
    """Per fx node name: ``uniform`` (node → the number of image-dependent operands), ``identity``
    (activations), ``gated`` (Mul node → the node of the common input x), ``detach`` (node → the
    argument positions to detach), ``layer_norm`` (nodes of LayerNormalization modules), ``softmax``."""

    uniform: dict = field(default_factory=dict)
    identity: set = field(default_factory=set)
    gated: dict = field(default_factory=dict)
    detach: dict = field(default_factory=dict)
    layer_norm: set = field(default_factory=set)
    softmax: set = field(default_factory=set)
    additive: set = field(default_factory=set)
    #: the image's own normalisation at the graph's start (Transpose, Cast and arithmetic with constants:
    #: (x - mean) / std written in the graph), node names in order; ``entry``: the last of them
    prelude: list = field(default_factory=list)
    entry: str | None = None
    layout: list = field(default_factory=list)  # the prelude's Transposes

    def counts(self) -> dict:
        return {"uniform": len(self.uniform), "identity": len(self.identity), "gated": len(self.gated),
                "detach": len(self.detach), "layer_norm": len(self.layer_norm), "softmax": len(self.softmax)}


def plan(graph_module, op_types: dict) -> Plan:
    """Where each rule applies in ``graph_module`` (an fx module from onnx2torch whose call_module
    targets are the normalised graph's node names; ``op_types``: node name → ONNX op type)."""
    nodes = list(graph_module.graph.nodes)

    def op(n):
        return op_types.get(str(n.target)) if n.op == "call_module" else None

    dependent = set()
    for n in nodes:
        if n.op == "placeholder":
            dependent.add(n)
        elif op(n) not in NO_VALUE_FLOW and any(i in dependent for i in n.all_input_nodes):
            dependent.add(n)

    def operands(n):
        return [a for a in n.args if hasattr(a, "op")]

    def chain(n):
        """``n`` and the tensors it is an elementwise function of (through one-input elementwise ops
        and arithmetic with constants), nearest first; the last one's op ends the walk."""
        out = [n]
        for _ in range(32):
            o = op(n)
            carriers = [a for a in operands(n) if a in dependent]
            if len(carriers) != 1 or not (o in _UNARY or (o in _ARITHMETIC and len(operands(n)) <= 2)):
                break
            n = carriers[0]
            out.append(n)
        return out

    def normaliser(n):
        last = chain(n)[-1]
        return op(last) in _REDUCTIONS

    p = Plan()
    inside = set()  # the ops of gated units (their own rules do not matter: no gradient reaches them)
    for n in nodes:
        o = op(n)
        if n not in dependent or o is None:
            continue
        args = operands(n)
        image_args = [a for a in args if a in dependent]
        if o in _PRODUCTS and len(image_args) >= 2:
            p.uniform[n.name] = len(image_args)
        elif o == "Div" and len(args) == 2 and args[1] in dependent:
            p.detach[n.name] = (1,)
        elif o == "Mul" and len(image_args) == 2:
            a, b = args[0], args[1]
            ca, cb = chain(a), chain(b)
            common = [t for t in ca if t in cb]
            if common:  # x·f(x): one activation
                p.gated[n.name] = common[0].name
                inside.update(t.name for t in ca[:ca.index(common[0])] + cb[:cb.index(common[0])])
            elif normaliser(b) and not normaliser(a):
                p.detach[n.name] = (1,)
            elif normaliser(a) and not normaliser(b):
                p.detach[n.name] = (0,)
            else:
                p.uniform[n.name] = 2
        elif o in ACTIVATIONS and image_args and image_args[0] is args[0]:
            p.identity.add(n.name)
        elif o in _LAYER_NORMS:
            p.layer_norm.add(n.name)
        elif o == "Softmax":
            p.softmax.add(n.name)
    p.identity -= inside

    image = next((n for n in nodes if n.op == "placeholder"), None)
    at = image
    while at is not None:  # the image's own normalisation: relevance is read where it ends
        users = [u for u in at.users if u in dependent]
        if len(users) != 1 or [a for a in operands(users[0]) if a in dependent] != [at]:
            break
        u, o = users[0], op(users[0])
        if not (o in ("Transpose", "Cast", "Identity") or (o in _ARITHMETIC and len(operands(u)) == 2)):
            break
        p.prelude.append(u.name)
        if o == "Transpose":
            p.layout.append(u.name)
        at = u
    p.entry = p.prelude[-1] if p.prelude else None
    prelude = set(p.prelude)

    def added(n, depth=0):
        """Whether every use of ``n`` reaches an addition to (or concatenation with) image-dependent
        values, through layout ops only."""
        users = list(n.users)
        return bool(users) and depth < 8 and all(
            (u in dependent and op(u) in ("Add", "Sub", "Concat") and u.name not in prelude)
            or (op(u) in _LAYOUT and u.args and u.args[0] is n and added(u, depth + 1)) for u in users)

    p.additive = {n.name for n in nodes if n.op == "get_attr" and added(n)}  # for the accounting
    return p


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_plan(engine) -> Plan:
    found = _PLANS.get(engine.graph_module)
    if found is None:
        found = _PLANS[engine.graph_module] = plan(engine.graph_module, engine.op_types)
    return found


# running the module with the rules ----------------------------------------------------------------
def _interpreter_class():
    torch = _torch()
    _, _, Watch, Record = functions()

    class Rules(torch.fx.Interpreter):
        """Runs the fx module node by node with the plan's rules. With ``account`` (a dict), the
        constants added to image-dependent values (biases, class tokens, positional embeddings, layer
        norms' shifts) become leaves requiring gradients, listed in ``account["leaves"]``, and the
        relevance at every softmax's output and input is summed into ``account``."""

        def __init__(self, module, rules: Plan, account: dict | None = None, entries: list | None = None):
            super().__init__(module)
            self.rules, self.account, self.entries = rules, account, entries
            self.by_name = {n.name: n for n in module.graph.nodes}
            # a gated unit's input x is read again at its Mul: freed after the last of those instead
            order = {n: i for i, n in enumerate(module.graph.nodes)}
            last = {}
            for mul, x in rules.gated.items():
                m, x = self.by_name[mul], self.by_name[x]
                if x not in last or order[m] > order[last[x]]:
                    last[x] = m
            for user, frees in self.user_to_last_uses.items():
                self.user_to_last_uses[user] = [f for f in frees if f not in last]
            for x, m in last.items():
                self.user_to_last_uses.setdefault(m, []).append(x)

        def leaf(self, value):
            value = value.detach().clone().requires_grad_(True)
            self.account.setdefault("leaves", []).append(value)
            return value

        def run_node(self, n):
            out = self._run_node(n)
            if n.name == self.rules.entry and self.entries is not None:
                out = Record.apply(out, self.entries)
            return out

        def _run_node(self, n):
            r = self.rules
            if n.op == "get_attr" and self.account is not None and n.name in r.additive:
                value = super().run_node(n)
                return self.leaf(value) if value.is_floating_point() else value
            if n.op != "call_module":
                return super().run_node(n)
            name = n.name
            if name in r.uniform:
                return divide_gradient(super().run_node(n), r.uniform[name])
            if name in r.identity:
                return identity_rule(self.env[n.args[0]], super().run_node(n))
            if name in r.gated:
                return identity_rule(self.env[self.by_name[r.gated[name]]], super().run_node(n))
            if name in r.detach:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                args = tuple(a.detach() if i in r.detach[name] else a for i, a in enumerate(args))
                return self.call_module(n.target, args, kwargs)
            if name in r.layer_norm:
                args, _ = self.fetch_args_kwargs_from_env(n)
                return self._layer_norm(self.fetch_attr(n.target), args)
            if self.account is None:
                return super().run_node(n)
            if name in r.softmax:
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                z = Watch.apply(args[0], self.account, "softmax_in")
                return Watch.apply(self.call_module(n.target, (z, *args[1:]), kwargs), self.account, "softmax_out")
            out = super().run_node(n)
            module = self.fetch_attr(n.target)
            bias = getattr(module, "bias", None)
            conv = isinstance(module, torch.nn.modules.conv._ConvNd)
            if isinstance(bias, torch.Tensor) and (conv or isinstance(module, torch.nn.Linear)):
                b = bias.reshape(-1, *[1] * (out.dim() - 2)) if conv else bias
                out = out - b.detach() + self.leaf(b)  # the same values; the bias's share measured
            return out

        def _layer_norm(self, module, args):
            x = args[0]
            scale = args[1] if len(args) > 1 else getattr(module, "scale", getattr(module, "weight", None))
            bias = args[2] if len(args) > 2 else getattr(module, "bias", None)
            if hasattr(module, "normalized_shape"):
                dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
                eps = module.eps
            else:
                dims = tuple(range(module.axis % x.dim(), x.dim()))
                eps = module.epsilon
            shape = x.shape[dims[0]:]
            scale = None if scale is None else scale.expand(shape)
            bias = None if bias is None else bias.expand(shape)
            if self.account is not None and bias is not None:
                bias = self.leaf(bias)
            return layer_norm_rule(x, dims, eps, scale, bias)

    return Rules


_RULES = None


def run(graph_module, rules: Plan, x, account: dict | None = None, entries: list | None = None):
    """The module's output(s) for ``x`` with the rules in its backward pass; ``entries``: a list that
    the backward pass fills with the relevance where the image's own normalisation ends (``Plan.entry``)."""
    global _RULES
    if _RULES is None:
        _RULES = _interpreter_class()
    return _RULES(graph_module, rules, account, entries).run(x)


def logits(engine, x, account: dict | None = None, entries: list | None = None):
    """(N, K) scores of the engine's graph for ``x`` in the graph's input form, with the rules (as
    ``PixelModel.logits``: image by image for a graph that keeps its exported batch of 1)."""
    torch = _torch()
    pm = engine.pixel_model
    if pm.one_at_a_time and len(x) > 1:
        return torch.cat([logits(engine, x[i:i + 1], account, entries) for i in range(len(x))])
    guard = getattr(pm, "guard", None)
    if guard is not None:
        guard.check(tuple(x.shape), torch=True)
    out = run(engine.graph_module, engine_plan(engine), x, account, entries)
    if isinstance(out, (tuple, list)):
        out = out[pm.logits_index]
    return out.reshape(out.shape[0], -1)


def input_relevance(graph_module, rules: Plan, x, gradient, entries: list):
    """The relevance of the graph's input ``x``: ``x * gradient``, or, for a graph that normalises its
    own input, the relevance where that normalisation ends (``entries``) carried back to the input's
    layout, unchanged (the identity rule: elementwise functions of one pixel value; so a graph that
    normalises inside gives the map of the same network normalising outside, and a black pixel is not
    a zero by construction)."""
    torch = _torch()
    if rules.entry is None:
        return (x * gradient).detach()
    r = torch.cat(entries)
    if not rules.layout:
        return r
    probe = x.detach().requires_grad_(True)
    with torch.enable_grad():
        v = probe
        for name in rules.layout:  # Transposes only: carried back by their own (permuting) gradients
            v = graph_module.get_submodule(name)(v)
        back, = torch.autograd.grad(v, probe, r)
    return back.detach()


def relevance(graph_module, rules: Plan, x, score, account: bool = False):
    """Input relevance (``input_relevance``) for ``score`` (the module's output → a scalar), with the
    score's value; with ``account``, also the relevance absorbed by the constants added (``biases``)
    and the softmaxes' loss (``softmax``: their outputs' relevance less their inputs'), summed."""
    torch = _torch()
    x = x.detach().clone().requires_grad_(True)
    book = {} if account else None
    entries = []
    with torch.enable_grad():
        s = score(run(graph_module, rules, x, book, entries))
        leaves = book.get("leaves", []) if account else []
        grads = torch.autograd.grad(s, [x, *leaves], allow_unused=True)
    out = {"input": input_relevance(graph_module, rules, x, grads[0], entries), "score": float(s.detach())}
    if account:
        out["biases"] = float(sum(float((l.detach().double() * g.double()).sum()) for l, g in zip(leaves, grads[1:])
                                  if g is not None))
        out["softmax"] = book.get("softmax_out", 0.0) - book.get("softmax_in", 0.0)
    return out
