"""Send a model's ``torch.nn.functional.scaled_dot_product_attention`` calls to fusedlm.

Most PyTorch models that are not Hugging Face ones (nanoGPT, timm's ViTs, torchtitan-style
code, ``nn.TransformerEncoderLayer`` through ``nn.MultiheadAttention(need_weights=False)``) call
``F.scaled_dot_product_attention`` directly. :class:`FusedSDPAMode` is a ``TorchFunctionMode``
that, while active, hands those calls to :func:`fusedlm.ops.attention.sdpa_with_route`, the
drop-in that runs our kernels where they can take the call and torch's SDPA otherwise; every
other torch call passes through unchanged. No function or class of torch or the model is
replaced.

``patch(model, attention=True)`` activates the mode around the model's calls with forward
hooks: the outermost hooked call of a thread enters it and leaves it when that call returns or
raises. The first call has hooks on every module and notes which modules make SDPA calls;
from the next call on only those keep hooks, so the handler runs for the attention modules'
own torch calls only. Hooks on the attention modules, not on the root, because activation
checkpointing re-runs a block's forward during backward, outside the root's call: the
attention modules' hooks make the recomputation take the same route as the original forward
(torch's non-reentrant checkpoint raises when the recomputation saves other tensors). A
plain function checkpointed inside an attention module (``checkpoint(self._core, q, k, v)``)
recomputes with none of our hooks running, so on torch's SDPA: its forward call takes torch's
SDPA too. Such a call is told by torch's saved-tensor hooks: a checkpoint's hooks pushed after
the innermost hooked module was entered. ``nn.MultiheadAttention`` is not reached this way
(it dispatches ``F.multi_head_attention_forward`` as one function, whose inner SDPA call runs
with modes off): ``patch`` swaps those modules for ``fusedlm.nn.MultiheadAttention`` instead.

The cost: while active, every torch call goes through the mode's Python handler (torch's
design for function modes; ~1-2 us a call on this VM), and the drop-in costs more host time
than torch's SDPA. ``benchmarks/sdpa_mode_overhead.py`` measures a small model; the numbers are
in ``benchmarks/NOTES.md``. That is host time, which a GPU hides when its kernels are the
longer part (large batches), and which shows on small, host-bound steps. Under
``torch.compile`` the mode is traced away: the graph holds fusedlm's ops and no handler runs.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..backends import check_backend_name
from ..ops.attention import sdpa_with_route

_TORCH_SDPA = F.scaled_dot_product_attention
# The arguments sdpa_with_route understands; a call with others (a newer torch's) goes to torch.
_SDPA_KEYWORDS = frozenset(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))
_SDPA_MAX_POSITIONAL = 8
# The (pack, unpack) saved-tensor hooks on top of autograd's stack, or None (a private torch
# binding: without it, no call is taken for a checkpointed plain function's).
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks",
                                   lambda ignore_is_tracing: None)
# The __dict__ key under which patch(attention=True) keeps a model's AttentionRouting.
ROUTING_KEY = "_fusedlm_sdpa_routing"


class FusedSDPAMode(TorchFunctionMode):
    """While active (``with FusedSDPAMode(): ...``), ``F.scaled_dot_product_attention`` calls go
    to fusedlm's drop-in; other torch calls are untouched.

    ``backend``: "auto" (fusedlm's kernels where one serves the inputs, torch's SDPA otherwise)
    or a backend name. ``calls`` counts the eager calls by where they ran: ``"fused"`` (our
    kernels) and ``"torch"`` (torch's SDPA: masks or inputs our kernels cannot take).
    Calls traced by ``torch.compile`` are not counted."""

    def __init__(self, backend: str = "auto", calls: Counter | None = None,
                 on_call: Callable[[], bool] | None = None) -> None:
        super().__init__()
        check_backend_name(backend)
        self.backend = backend
        self.calls = Counter() if calls is None else calls
        # Told of each SDPA call (AttentionRouting's discovery); True sends it to torch's SDPA.
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _TORCH_SDPA:
            return func(*args, **kwargs)
        to_torch = self.on_call is not None and self.on_call()
        # all(...), not _SDPA_KEYWORDS.issuperset(kwargs): torch 2.8's dynamo fails tracing that
        if (to_torch or len(args) > _SDPA_MAX_POSITIONAL
                or not all(name in _SDPA_KEYWORDS for name in kwargs)):
            out, fused = func(*args, **kwargs), False
        else:
            out, fused = sdpa_with_route(*args, **kwargs, backend=self.backend)
        if not torch.compiler.is_compiling():
            self.calls["fused" if fused else "torch"] += 1
        return out


class AttentionRouting:
    """One model's routing: forward hooks that activate a :class:`FusedSDPAMode` for the
    outermost hooked call of a thread and deactivate it when that call returns or raises.

    The first complete call of the model itself (discovery) has hooks on every module of the
    model and notes the innermost module running at each SDPA call (calls of a submodule before
    it, such as an encoder run alone, route and add theirs but do not end discovery: they do not
    show the whole model). At the start of the next outermost call, with no other call in
    flight, the hooks move to those modules only, so the mode's handler runs for the attention
    modules' own torch calls rather than the whole model's. A module that calls SDPA only in
    later calls (not in the first) keeps torch's SDPA. ``calls`` is shared by the modes it
    creates."""

    def __init__(self, backend: str, model: torch.nn.Module) -> None:
        self.backend = backend
        self._root = model
        self.calls: Counter = Counter()
        self.targets: list[torch.nn.Module] | None = None  # None while discovering
        self._found: dict[int, torch.nn.Module] = {}
        self._discovered = False
        self._handles: list = []
        self._thread = threading.local()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._attach(list(model.modules()))  # modules() yields each once

    def __getstate__(self) -> dict:
        # deepcopy / pickle of a patched model: the copy gets its own lock and per-thread state
        state = dict(self.__dict__)
        del state["_thread"], state["_lock"]
        state["_in_flight"] = 0
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread = threading.local()
        self._lock = threading.Lock()

    def _attach(self, modules: list[torch.nn.Module]) -> None:
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave, always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stack(self) -> list:
        stack = getattr(self._thread, "stack", None)
        if stack is None:
            stack = self._thread.stack = []
        return stack

    def _on_sdpa_call(self) -> bool:
        """Notes the innermost hooked module (discovery); True when the call must take torch's
        SDPA: a non-reentrant checkpoint region opened inside that module, whose recomputation
        in backward will run with none of our hooks (so on torch's SDPA)."""
        stack = self._stack()
        if not stack:
            return False
        module, hooks_at_entry = stack[-1]
        if self.targets is None:
            self._found.setdefault(id(module), module)
        if torch.compiler.is_compiling():
            return False
        hooks = _top_saved_tensors_hooks(False)
        return (hooks is not None and (hooks_at_entry is None or hooks[0] is not hooks_at_entry[0])
                and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint")

    def _enter(self, module, args) -> None:
        stack = self._stack()
        if not stack:
            if not torch.compiler.is_compiling():
                with self._lock:
                    if self._discovered and self.targets is None and self._in_flight == 0:
                        # Safe here: this call's own post hook is read after its forward, so
                        # it is the new one (targets) or none (then this call is not entered).
                        self.detach()
                        self.targets = list(self._found.values())
                        self._attach(self.targets)
                        if id(module) not in self._found:
                            return
                    self._in_flight += 1
            mode = FusedSDPAMode(self.backend, self.calls, on_call=self._on_sdpa_call)
            self._thread.mode = mode
            mode.__enter__()
        compiling = torch.compiler.is_compiling()
        stack.append((module, None if compiling else _top_saved_tensors_hooks(False)))

    def _leave(self, module, args, output) -> None:
        stack = self._stack()
        stack.pop()
        if not stack:
            mode, self._thread.mode = self._thread.mode, None
            mode.__exit__(None, None, None)
            if not torch.compiler.is_compiling():
                with self._lock:
                    self._in_flight -= 1
                    # output is None when the call raised (torch's always_call hooks): a call
                    # that failed early says nothing about where SDPA is called, unless it
                    # already found some.
                    self._discovered |= module is self._root and (
                        output is not None or bool(self._found))


def route_attention(model: torch.nn.Module, backend: str) -> tuple[AttentionRouting, str]:
    """Install (once) the routing on every module of ``model``; (routing, a note for the
    report)."""
    routing = model.__dict__.get(ROUTING_KEY)
    if routing is not None:
        return routing, "attention: already routed to fusedlm (an earlier patch)"
    routing = AttentionRouting(backend, model)
    model.__dict__[ROUTING_KEY] = routing
    return routing, (
        f"attention: F.scaled_dot_product_attention calls inside the model's forward go to "
        f"fusedlm.scaled_dot_product_attention (backend {backend!r}; after the first call, "
        f"only the modules that made such calls in it keep the routing hooks; counts in "
        f"fusedlm.integrations.attention_calls(model))"
    )


def unroute_attention(model: torch.nn.Module) -> str | None:
    """Remove the routing ``route_attention`` installed; a note for the report, or None."""
    routing = model.__dict__.pop(ROUTING_KEY, None)
    if routing is None:
        return None
    routing.detach()
    return "attention: F.scaled_dot_product_attention calls are torch's again"


def attention_calls(model: torch.nn.Module) -> Counter:
    """How the eager SDPA calls of a model patched with ``attention=True`` ran: a Counter of
    ``"fused"`` and ``"torch"`` (empty if it is not routed)."""
    routing = model.__dict__.get(ROUTING_KEY)
    return Counter() if routing is None else routing.calls
