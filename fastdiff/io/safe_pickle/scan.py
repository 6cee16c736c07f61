"""The opcode pre-pass: before a pickle is run, every opcode and its argument is checked complete (no
declared length is allocated before it is known to be in the file) and containers nest at most
:data:`MAX_DEPTH` deep (CPython hashes nested tuples recursively in C, so a deep dict key would crash the
process before any Python check ran)."""

from __future__ import annotations

import pickletools

from fastdiff.io.safe_pickle.budget import current_budget
from fastdiff.io.safe_pickle.errors import MalformedPickleError, PickleLimitError, SafePickleError, _r

MAX_DEPTH = 300
"""Deepest container nesting a file may have (counted conservatively over the opcode stream; the official
EDM2 pickles stay well below 100)."""

MAX_STACK = 1_000_000
"""Most values the unpickler's stack may hold at once (the standard pickler batches containers by 1000)."""

MAX_MEMO = 1_000_000
"""Most memo entries a pickle may create (an EDM2 network pickle has tens of thousands)."""


_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def scan_opcodes(f, source, max_depth=MAX_DEPTH) -> int:
    """Check one pickle in the seekable binary stream ``f`` (from its current position) without building
    anything: every opcode and argument complete, and container nesting at most ``max_depth``.

    Depth is tracked over a model of the unpickler's stack: each value carries a depth (0 for a scalar),
    a new object one more than the deepest it consumes, an in-place update (APPEND, SETITEM, BUILD...) raises
    its container's depth. A memo entry keeps the depth its value had when it was memoized: exact for the
    immutable values (tuples, frozensets) whose hashing recurses; a mutable container memoized and grown
    later is understated, but it is not hashable, and whatever it holds was bounded when built (deep mutable
    nesting is caught by :func:`plain_tree` instead). The stack and the memo are capped at
    :data:`MAX_STACK` and :data:`MAX_MEMO` entries. Returns the number of opcodes."""
    stack, marks, memo = [], [], {}
    count = 0
    mark = pickletools.markobject

    def too_deep():
        return PickleLimitError(f"{source}: the pickle is nested too deeply (more than {max_depth} levels)")

    try:
        for op, arg, _pos in pickletools.genops(f):
            count += 1
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
                continue
            floor = marks[-1] if marks else 0
            if name in _PUTS or name == "MEMOIZE":
                if len(stack) <= floor:
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} on an empty stack)")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                if len(memo) > MAX_MEMO:
                    raise PickleLimitError(f"{source}: the pickle memoizes more than {MAX_MEMO:,} objects")
                continue
            if name in _GETS:
                if arg not in memo:
                    raise MalformedPickleError(f"{source}: not a valid pickle (memo entry {_r(arg)} is missing)")
                stack.append(memo[arg])
                continue
            if name == "DUP":
                if len(stack) <= floor:
                    raise MalformedPickleError(f"{source}: not a valid pickle (DUP on an empty stack)")
                stack.append(stack[-1])
                continue
            if name == "POP":
                if len(stack) > floor:
                    stack.pop()
                elif marks:
                    marks.pop()
                else:
                    raise MalformedPickleError(f"{source}: not a valid pickle (POP on an empty stack)")
                continue
            before = op.stack_before
            if mark in before:
                if not marks:
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} without a MARK)")
                m = marks.pop()
                below = before.index(mark)
                if m - below < (marks[-1] if marks else 0):
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} on an empty stack)")
                consumed = stack[m - below:]
                del stack[m - below:]
            else:
                n = len(before)
                if len(stack) - floor < n:
                    raise MalformedPickleError(f"{source}: not a valid pickle ({name} on a short stack)")
                consumed = stack[len(stack) - n:] if n else []
                if n:
                    del stack[len(stack) - n:]
            if name in _IN_PLACE:
                depth = max(consumed[0], 1 + max(consumed[1:])) if len(consumed) > 1 else consumed[0]
            elif op.stack_after:
                depth = 1 + max(consumed) if consumed else 0
            else:
                continue
            if depth > max_depth:
                raise too_deep()
            stack.append(depth)
            if len(stack) > MAX_STACK:
                raise PickleLimitError(f"{source}: the pickle's stack grows past {MAX_STACK:,} entries")
    except SafePickleError:
        raise
    except Exception as exc:  # genops: truncated arguments, unknown opcodes, missing STOP
        raise MalformedPickleError(f"{source}: not a valid pickle ({_r(str(exc))})") from None
    budget = current_budget()
    if budget is not None:
        budget.opcodes += count
    return count
