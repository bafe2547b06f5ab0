"""Bookkeeping that lets probes leave no trace: weights, buffers and random numbers.

Memory: one extra copy of the probed parameters, alive only during a probe step (with
``defer_probes``, from the probe step to the end of the next one).

After the base optimizer's step the parameters hold ``w1`` and the snapshot holds ``w0``.
The two are exchanged exactly (the parameter's storage pointer is swapped when it owns its
storage alone, an XOR through integer views otherwise), so the snapshot keeps ``w1``
*exactly* while the parameters serve as scratch. A parameter at offset ``s`` holds
``w1 + s * (w1 - w0)``; moving to another offset is one fused ``lerp`` against the exact
``w1``. Offset 0 (``w1`` itself) would erase the direction, so it is reached by exchanging
again instead. At the end every parameter is back on its own storage: rejected groups hold
exactly ``w1``, updated ones their new point, written straight into that storage.

Sharded parameters (``DTensor``, as made by FSDP2's ``fully_shard``) are handled shard-wise:
every exchange and move works on the process's local shard, in place (FSDP gathers the next
forward's full parameters from the shard's own storage, so it is never swapped for another).
This is right for every placement whose local tensor holds plain elements of the parameter
(``Shard``, ``Replicate``); a shard with no elements on this process simply does nothing.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Offsets this close to 0 are taken as w1 itself: a parameter at a tiny offset holds almost
# nothing of the direction, and moving on from it would amplify rounding by 1 / offset.
_SNAP = 1e-3


def snapped(offset: float) -> float:
    """The offset :meth:`GroupMover.move` goes to: 0 (``w1`` itself) when within ``_SNAP``."""
    return 0.0 if abs(offset) < _SNAP else offset


def _dtensor_class() -> type | None:
    """``DTensor`` if its module is loaded (no tensor can be one otherwise): looked up, not
    imported, as importing it costs most of a second."""
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(name), "DTensor", None)
        if cls is not None:
            return cls  # type: ignore[no-any-return]
    return None


def _local(t: torch.Tensor, dtensor: type | None) -> torch.Tensor:
    """The local shard of a ``DTensor`` (aliasing its storage), or ``t`` itself."""
    if dtensor is not None and isinstance(t, dtensor):
        return t._local_tensor.detach()  # type: ignore[attr-defined, no-any-return]
    return t


def _xor_swap(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.is_complex():
        x, y = torch.view_as_real(x), torch.view_as_real(y)
    dtype = _INT_VIEW[x.element_size()]
    xi, yi = x.view(dtype), y.view(dtype)
    xi.bitwise_xor_(yi)
    yi.bitwise_xor_(xi)
    xi.bitwise_xor_(yi)


def _owns_storage(t: torch.Tensor) -> bool:
    return (
        t._base is None
        and t.storage_offset() == 0
        and t.is_contiguous()
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``params``: views into one buffer per device and dtype (a single allocation
    is several times faster than one per tensor on the CPU), or clones for ``DTensor``s."""
    dtensor = _dtensor_class()
    copies: list[torch.Tensor | None] = [None] * len(params)
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        if dtensor is not None and isinstance(p, dtensor):
            copies[i] = p.detach().clone()
        else:
            by_kind.setdefault((p.device, p.dtype), []).append(i)
    for (device, dtype), index in by_kind.items():
        buffer = torch.empty(sum(params[i].numel() for i in index), dtype=dtype, device=device)
        views, start = [], 0
        for i in index:
            n = params[i].numel()
            views.append(buffer[start : start + n].view(params[i].shape))
            copies[i] = views[-1]
            start += n
        torch._foreach_copy_(views, [params[i].detach() for i in index])
    return copies  # type: ignore[return-value]


def swap_plan(params: list[torch.Tensor], buffers: list[torch.Tensor]) -> list[bool]:
    """For each pair, whether :func:`_exchange` may swap pointers: one of the two owns its
    storage alone. Exchanging keeps that true (it swaps the two), so the plan is computed once
    per probe step."""
    return [_owns_storage(p) or _owns_storage(b) for p, b in zip(params, buffers, strict=True)]


def _exchange(
    params: list[torch.Tensor], buffers: list[torch.Tensor], plan: list[bool] | None = None
) -> None:
    """Exchange the contents of ``params[i]`` and ``buffers[i]`` exactly, in place.

    Pointer swap when one of the two owns its storage alone (``plan[i]``, see
    :func:`swap_plan`; ``buffers`` is updated to hold the parameter's old storage): a parameter
    that does is lent a view of the snapshot and gets its own storage back at the next
    exchange. Bitwise XOR swap otherwise (a parameter that is a view of shared storage, and
    the local shards of ``DTensor`` parameters, whose storage must stay where their container
    put it).
    """
    dtensor = _dtensor_class()
    if plan is None:
        plan = swap_plan(params, buffers)
    for i, (p, b) in enumerate(zip(params, buffers, strict=True)):
        if dtensor is not None and isinstance(p, dtensor):
            _xor_swap(_local(p, dtensor), _local(b, dtensor))
        elif plan[i]:
            old = p.data
            p.data = b
            buffers[i] = old
        else:
            _xor_swap(p.data, b)


class GroupMover:
    """Moves one group's parameters along its step; see the module docstring."""

    def __init__(
        self, params: list[torch.Tensor], w1: list[torch.Tensor], plan: list[bool] | None = None
    ) -> None:
        self.params = params
        self.w1 = w1  # exact w1 while not swapped; the parked point while swapped
        self.plan = swap_plan(params, w1) if plan is None else plan
        self.offset = -1.0
        self._parked = 0.0  # offset held by self.w1 while swapped
        self._swapped = False
        self._finished = False
        dtensor = _dtensor_class()
        sharded = dtensor is not None and any(isinstance(p, dtensor) for p in params)
        self._dtensor = dtensor if sharded else None

    @property
    def sharded(self) -> bool:
        """Whether the parameters are DTensor shards."""
        return self._dtensor is not None

    def _operands(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The tensors the arithmetic runs on: the parameters and ``w1``, or their local shards."""
        if self._dtensor is None:
            return self.params, self.w1
        return [_local(p, self._dtensor) for p in self.params], [
            _local(w, self._dtensor) for w in self.w1
        ]

    def move(self, offset: float) -> None:
        offset = snapped(offset)
        if offset == self.offset or not self.params:
            return
        if offset == 0.0:
            _exchange(self.params, self.w1, self.plan)
            self._swapped, self._parked, self.offset = True, self.offset, 0.0
            return
        self._unswap()
        # params = w1 + alpha * (params - w1) with alpha = offset / current offset
        params, w1 = self._operands()
        torch._foreach_lerp_(params, w1, 1.0 - offset / self.offset)
        self.offset = offset

    def moved(self) -> torch.Tensor:
        """Whether the base step changed any parameter of the group (a bool scalar tensor).
        On the CPU ``torch.equal`` stops at the first difference (a step usually changes the
        first element); elsewhere one reduction per tensor stays on the device (no host sync
        per parameter)."""
        if not self.params:
            return torch.zeros((), dtype=torch.bool)
        params, w1 = self._operands()
        if all(p.device.type == "cpu" for p in params):
            same = all(torch.equal(p, w) for p, w in zip(params, w1, strict=True))
            return torch.tensor(not same)
        return torch.stack([torch.ne(p, w).any() for p, w in zip(params, w1, strict=True)]).any()

    def pushed(self) -> torch.Tensor:
        """Whether any gradient of the group has a non-zero element (a bool scalar tensor): with
        :meth:`moved` false, the rate is too small for the step to change the weights."""
        grads = [_local(p.grad, self._dtensor) for p in self.params if p.grad is not None]
        grads = [g.coalesce()._values() if g.is_sparse else g for g in grads]
        if not grads:
            return torch.zeros((), dtype=torch.bool)
        if all(g.device.type == "cpu" for g in grads):
            return torch.tensor(any(bool(g.any()) for g in grads))
        return torch.stack([g.ne(0).any() for g in grads]).any()

    def _unswap(self) -> None:
        if self._swapped:
            _exchange(self.params, self.w1, self.plan)
            self._swapped, self.offset = False, self._parked

    def finish(self, offset: float) -> None:
        """End at ``w1 + offset * (w1 - w0)`` (exactly ``w1`` for offset 0), each parameter
        on its own storage again. Terminal: the mover is not used afterwards."""
        if not self.params or self._finished:
            return
        self._finished = True
        self._unswap()
        if offset != 0.0:
            # write the final point into w1's buffers (the parameters' own storage), then exchange
            params, w1 = self._operands()
            torch._foreach_lerp_(w1, params, offset / self.offset)
        _exchange(self.params, self.w1, self.plan)
        self.offset = offset

    def reset(self) -> None:
        """Put back exactly ``w1``, the point of the plain base step."""
        self.finish(0.0)


class BufferGuard:
    """Restores every buffer that a module called during probing changed or replaced.

    While the guard is active, a global forward pre-hook snapshots, before a module runs for
    the first time, the buffers of that module and of all its submodules (experts a router did
    not pick, branches not taken); after each probe they are all put back (BatchNorm's running
    statistics and ``num_batches_tracked`` among them): copied back in place, and re-attached
    where a forward replaced a buffer with a new tensor. Version counters cannot tell which
    changed: native kernels such as batch norm update their running statistics without bumping
    them.

    The hook is one function for all guards (``torch.compile`` does not recompile for each new
    guard); inside compiled code its work runs as a graph break.
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        # parameters by storage: a buffer that overlaps one is parameter data, moved by the
        # movers (a flat-parameter layout), not a buffer to put back
        self._params: dict[int, list[torch.Tensor]] = {}
        for p in params:
            if (ptr := storage_ptr(p)) is not None:
                self._params.setdefault(ptr, []).append(p)
        self._covered: set[nn.Module] = set()
        self._names: list[tuple[nn.Module, set[str]]] = []
        self._owners: list[tuple[nn.Module, str]] = []
        self._buffers: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._outer: BufferGuard | None = None

    def cover(self, module: nn.Module) -> None:
        if module in self._covered:
            return
        for _, sub in module.named_modules(memo=self._covered):  # adds to the memo
            self._names.append((sub, set(sub._buffers)))
            for name, buf in sub._buffers.items():
                if buf is not None and not self._is_parameter_data(buf):
                    saved = buf.detach().clone()  # first: a failed clone records nothing
                    self._owners.append((sub, name))
                    self._buffers.append(buf)
                    self._saved.append(saved)

    def _is_parameter_data(self, buf: torch.Tensor) -> bool:
        ptr = storage_ptr(buf)
        return ptr is not None and any(overlap(buf, p) for p in self._params.get(ptr, ()))

    def __enter__(self) -> BufferGuard:
        global _ACTIVE_GUARD
        self._outer, _ACTIVE_GUARD = _ACTIVE_GUARD, self
        _ignore_compile_hook_warning()
        self._handle = nn.modules.module.register_module_forward_pre_hook(_guard_hook)
        return self

    def restore(self) -> None:
        for module, names in self._names:
            if len(module._buffers) != len(names) or not names.issuperset(module._buffers):
                for name in [n for n in module._buffers if n not in names]:
                    del module._buffers[name]  # registered by a probe's forward
        for (module, name), buf in zip(self._owners, self._buffers, strict=True):
            if module._buffers.get(name) is not buf:
                module._buffers[name] = buf  # the forward replaced it: the original goes back
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._saved)

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE_GUARD
        try:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            self.restore()
        finally:
            _ACTIVE_GUARD, self._outer = self._outer, None
            self._covered.clear()
            self._names.clear()
            self._owners.clear()
            self._buffers.clear()
            self._saved.clear()


_ACTIVE_GUARD: BufferGuard | None = None  # the guard of the probe in progress


@torch.compiler.disable
def _guard_hook(module: nn.Module, args: object) -> None:
    # not traced under torch.compile (a graph break: plain Python), so no guard on the module
    # it runs for: tracing it recompiled once per module class, up to dynamo's limit
    if _ACTIVE_GUARD is not None:
        _ACTIVE_GUARD.cover(module)


# the guard's hook fires an extra time for a torch.compile wrapper, as torch warns: that call
# is what covers the model inside it
_COMPILE_HOOK_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"


def _ignore_compile_hook_warning() -> None:
    """Add the filter for that warning unless it is there (changing the filters at every probe
    step would make the user's own "once" warnings repeat; a ``catch_warnings`` block around
    the import may have dropped it)."""
    for action, message, *_ in warnings.filters:
        if action == "ignore" and message is not None and message.pattern == _COMPILE_HOOK_WARNING:
            return
    warnings.filterwarnings("ignore", message=_COMPILE_HOOK_WARNING)


class RngReplay:
    """Every probe sees the same random numbers (common random numbers for dropout), and the
    training stream is left where it was: the state is captured once and set before each
    probe and again at the end."""

    def __init__(self, devices: list[torch.device]) -> None:
        self._cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})

    def __enter__(self) -> RngReplay:
        self._cpu = torch.get_rng_state()
        self._cuda_states = [torch.cuda.get_rng_state(i) for i in self._cuda]
        return self

    def replay(self) -> None:
        torch.set_rng_state(self._cpu)
        for i, state in zip(self._cuda, self._cuda_states, strict=True):
            torch.cuda.set_rng_state(state, i)

    def __exit__(self, *exc: object) -> None:
        self.replay()


def storage_ptr(t: torch.Tensor) -> int | None:
    """The address of the storage ``t`` is a view of (``None`` where there is none to read)."""
    try:
        ptr = int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return ptr or None  # meta tensors and empty storages have none


def byte_span(t: torch.Tensor) -> tuple[int, int] | None:
    """The address range ``[start, end)`` that ``t``'s elements lie in (``None`` where
    there is no storage to read, or no element)."""
    ptr = storage_ptr(t)
    if ptr is None or t.numel() == 0:
        return None
    start = ptr + int(t.storage_offset()) * t.element_size()
    extent = sum(int(n - 1) * int(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (extent + 1) * t.element_size()


def _bytes(t: torch.Tensor, start: int) -> torch.Tensor:
    size = t.element_size()
    offsets = torch.tensor(start, dtype=torch.int64)
    for n, stride in zip(t.shape, t.stride(), strict=True):
        offsets = offsets[..., None] + torch.arange(n, dtype=torch.int64) * (stride * size)
    return (offsets.reshape(-1, 1) + torch.arange(size, dtype=torch.int64)).reshape(-1)


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share a byte of memory: their address ranges first, then (only
    when those overlap: interleaved views such as ``w[:, :3]`` and ``w[:, 3:]``) byte by byte."""
    sa, sb = byte_span(a), byte_span(b)
    if sa is None or sb is None or sa[1] <= sb[0] or sb[1] <= sa[0]:
        return False
    return bool(torch.isin(_bytes(a, sa[0]), _bytes(b, sb[0])).any())


@contextlib.contextmanager
def probe_context(
    devices: list[torch.device], params: Iterable[torch.Tensor] = ()
) -> Iterator[tuple[RngReplay, BufferGuard]]:
    """No autograd, replayed random numbers, guarded buffers (except buffers that share
    storage with ``params``: the probes move those)."""
    with torch.no_grad(), RngReplay(devices) as rng, BufferGuard(params) as guard:
        yield rng, guard
