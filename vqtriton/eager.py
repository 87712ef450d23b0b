"""The eager fast path: a ``vqtriton`` custom op's own implementation and gradient, without the dispatcher.

``call("quantize", *args)`` is ``torch.ops.vqtriton.quantize(*args)``, result for result and bit for bit.
A custom op call costs tens of microseconds of Python and dispatcher work on the host before its body
runs (the Autograd kernel, a generated ``autograd.Function``, a redispatch to the backend kernel, the
aliasing checks): at one vector that is a large share of an op, on a GPU too. In eager mode nothing of
that is needed, so ``call`` runs the op's registered pieces directly:

- no gradient needed (grad mode off, or no tensor argument requiring grad): the op's function itself;
- otherwise one ``torch.autograd.Function`` (:class:`_OpFunction`) whose forward runs that function and
  the op's ``setup_context``, and whose backward runs the op's registered backward (as torch's
  generated one does, ``ctx.needs_input_grad`` included).

The math is the op's only copy: the function, setup_context and backward are the ones the op was
registered with (``torch.library.custom_op`` keeps them on its ``CustomOpDef``). The custom op itself
runs instead whenever something may have to see it: while ``torch.compile`` / ``torch.export`` trace
(``torch.compiler.is_compiling()``, checked first, so dynamo keeps just the op call: no graph break);
under a dispatch or function mode (fake tensors, ``make_fx``, ``opcheck``, ``FlopCounterMode``, a
``torch.device`` context), for tensor subclasses, under functorch transforms; for ops that mutate their
arguments, have device-specific kernels, or need a gradient and registered none (the op then raises
its own error). Any vqtriton op can use it: name it, pass its arguments positionally.
"""

from __future__ import annotations

import inspect

import torch
from torch.overrides import has_torch_function

# torch internals (2.4 - 2.14): where a release moves them, every call takes the custom op itself.
try:
    from torch._functorch.utils import unwrap_dead_wrappers
    from torch._library.custom_ops import OPDEFS
except ImportError:  # pragma: no cover - depends on the torch release
    OPDEFS = {}

    def unwrap_dead_wrappers(args):
        return args

__all__ = ["call"]


class _Spec:
    """What ``call`` needs of one op: its ``CustomOpDef``'s function, registered autograd and defaults."""

    def __init__(self, name: str):
        self.packet = getattr(torch.ops.vqtriton, name)
        opdef = OPDEFS.get(f"vqtriton::{name}")
        self.fn = self.setup = self.backward = None
        self.defaults: tuple = ()
        try:
            if opdef is None or set(opdef._backend_fns) != {None}:
                return  # not a torch.library.custom_op with one implementation: always the op
            if opdef._opoverload._schema.is_mutable:
                return  # mutated arguments need the op's version-counter bumps
            fn, setup, backward = opdef._init_fn, opdef._setup_context_fn, opdef._backward_fn
        except AttributeError:  # a torch release that keeps them elsewhere: always the op
            return
        params = list(inspect.signature(fn).parameters.values())
        self.fn, self.setup, self.backward = fn, setup, backward
        self.defaults = tuple(p.default for p in params)
        self.required = sum(p.default is inspect.Parameter.empty for p in params)


_SPECS: dict[str, _Spec] = {}


def _spec(name: str) -> _Spec:
    spec = _SPECS.get(name)
    if spec is None:
        spec = _SPECS[name] = _Spec(name)
    return spec


class _OpFunction(torch.autograd.Function):
    """A vqtriton op with a gradient in eager mode: its function, then its setup_context and backward."""

    @staticmethod
    def forward(ctx, spec: _Spec, *args):
        output = spec.fn(*args)
        if spec.setup is not None:
            spec.setup(ctx=ctx, inputs=args, output=output)
        ctx.spec = spec
        return output

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[1:]  # the op's own arguments, as its backward expects
        try:
            result = ctx.spec.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (None, *result) if isinstance(result, tuple) else (None, result)


# ``torch.autograd.Function.apply`` is a Python wrapper that binds defaults for a ``setup_context`` staticmethod
# (``_OpFunction`` has none), unwraps functorch's dead wrappers (``call`` does that too) and calls this.
_apply = super(torch.autograd.Function, _OpFunction).apply


def _plain(args: tuple) -> bool:
    """True when nothing would dispatch these arguments differently from plain eager tensors."""
    return not (
        torch._C._len_torch_dispatch_stack()
        or torch._C._are_functorch_transforms_active()
        or has_torch_function(args)  # a tensor subclass, or a torch function mode (non-tensors never count)
    )


def call(name: str, *args):
    """``torch.ops.vqtriton.<name>(*args)``, through the eager fast path when nothing needs the op itself."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.vqtriton, name)(*args)
    spec = _spec(name)
    if spec.fn is None or len(args) < spec.required or not _plain(args):
        return spec.packet(*args)
    args = args + spec.defaults[len(args):]  # the op's defaults, as the dispatcher hands them to setup_context
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        if spec.backward is None:
            return spec.packet(*args)
        return _apply(spec, *unwrap_dead_wrappers(args))
    return spec.fn(*args)
