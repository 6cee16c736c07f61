"""The allocation budget of one load: everything a file makes the reader allocate beyond the file itself
(tensor views, inflated zip members, storages, stand-in copies, the network built from it) is charged to it,
by default :data:`DEFAULT_BYTES_FACTOR` times the file's size (``max_bytes=`` raises it for a trusted file)."""

from __future__ import annotations

import contextlib
import contextvars

from fastdiff.io.safe_pickle.errors import PickleLimitError

DEFAULT_BYTES_FACTOR = 8
"""Default budget: what one load may allocate because the file says so, as a multiple of the file's size."""

DEFAULT_BYTES_SLACK = 1 << 20
"""Added to the default budget, so tiny files are not refused over a few kilobytes of bookkeeping."""


class _Budget:
    __slots__ = ("source", "max_bytes", "used", "opcodes", "explicit")

    def __init__(self, source, max_bytes, explicit):
        self.source, self.max_bytes, self.explicit = source, int(max_bytes), explicit
        self.used = 0
        self.opcodes = 0

    def charge(self, nbytes, what):
        self.used += int(nbytes)
        if self.used > self.max_bytes:
            how = ("raise max_bytes / --max-bytes" if self.explicit else
                   f"the default is {DEFAULT_BYTES_FACTOR}x the file's size; pass max_bytes= (fastdiff convert "
                   "--max-bytes) if the file is trusted")
            raise PickleLimitError(
                f"{self.source}: {what} would make the reader allocate more than {self.max_bytes:,} bytes in all "
                f"({how})"
            )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("fastdiff_pickle_budget", default=None)


@contextlib.contextmanager
def allocation_budget(source, file_bytes: int, max_bytes: int | None = None):
    """The allocation budget of one load of ``source`` (``file_bytes`` long): ``max_bytes`` bytes, by default
    ``DEFAULT_BYTES_FACTOR * file_bytes + DEFAULT_BYTES_SLACK``. Inside an enclosing budget, that one is used."""
    outer = _BUDGET.get()
    if outer is not None:
        yield outer
        return
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    limit = max_bytes if max_bytes is not None else DEFAULT_BYTES_FACTOR * int(file_bytes) + DEFAULT_BYTES_SLACK
    token = _BUDGET.set(_Budget(source, limit, max_bytes is not None))
    try:
        yield _BUDGET.get()
    finally:
        _BUDGET.reset(token)


def charge(nbytes, what: str) -> None:
    """Charge ``nbytes`` about to be allocated for ``what`` to the current load's budget (if any)."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.charge(nbytes, what)


_MODULE_BYTES = 2048  # what building one submodule is charged (Python objects, even for meta tensors)


@contextlib.contextmanager
def charged_construction():
    """While a network described by a file is built (on the meta device, say): every parameter, buffer and
    submodule registered is charged to the current allocation budget (parameters and buffers at the bytes
    they will hold), so a tiny file cannot make fastdiff build an unbounded network. The hooks are
    process-wide but charge only the thread that opened the budget (it lives in a context variable)."""
    from torch.nn.modules import module as M

    def tensor(_module, name, t):
        if t is not None:
            charge(t.numel() * t.element_size(), f"network tensor {name} of shape {tuple(t.shape)}")

    def submodule(_module, name, _child):
        charge(_MODULE_BYTES, f"network module {name}")

    handles = [M.register_module_parameter_registration_hook(tensor),
               M.register_module_buffer_registration_hook(tensor),
               M.register_module_module_registration_hook(submodule)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def current_budget() -> _Budget | None:
    """The budget of the load in progress in this context (None outside one)."""
    return _BUDGET.get()
