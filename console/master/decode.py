"""Bounded plain-data decoding: a peer's pickle is scanned for what it would build before anything is built."""

from __future__ import annotations

import io
import pickle
from typing import Any

# ---- the limits (README, "Security"): per message, whoever sends it ------------------------------
# Values a message decodes into: every str, bytes, number, bool, None and container, a shared one
# (pickle's memo) counted each time it is referenced, as anything walking the result would meet it.
MAX_VALUES = 2_000_000
# Bytes of text and binary data in it, counted the same way (a 1 MiB string referenced 100 times is 100 MiB).
MAX_DATA_BYTES = 64 * 1024 * 1024
# Containers inside containers (a submission is 6 deep: request, args, specs, spec, env, value).
MAX_DEPTH = 32
# Values waiting on the unpickler's stack at once (the standard pickler's batches keep it near 1,000), and
# containers among them still being filled: what the scan itself may hold, whatever a message claims.
MAX_STACK = 100_000
MAX_OPEN = 10_000


class Refused(pickle.UnpicklingError):
    """A message the master does not decode: it says which limit or which opcode, never the content."""


class PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (dict/list/tuple/set/str/bytes/int/float/bool/None need no global at all):
    any class or function reference is refused, so nothing runs. Use plain_loads(), which bounds it too."""

    def find_class(self, module: str, name: str) -> Any:
        raise Refused(f"refused: the master accepts plain data only, not {str(module)[:100]}.{str(name)[:100]}")


class _ClassReference(Refused):
    """The scan met a class or function reference: the unpickler refuses it (naming it), and all before
    it passed the scan."""


def plain_loads(data: bytes) -> Any:
    """The plain data a peer's pickle holds, within the limits above, or Refused. The scan runs first and
    builds nothing, so a refused message costs the bytes already read and a pass over them."""
    try:
        scan(data)
    except _ClassReference:
        pass  # PlainDataUnpickler.find_class refuses it, by name
    return PlainDataUnpickler(io.BytesIO(data)).load()


# A value on the scan's stack is one int packing what it amounts to: depth << _D | values << _E | bytes.
# Sums of packed ints add values and bytes field by field (the fields are wide enough for MAX_STACK
# values at the limits); the largest packed int has the greatest depth. An open container (one still
# being filled) is a list [values, bytes, depth, packed once closed or None] until its parent takes it.
_E, _D = 44, 84
_BMASK, _EMASK = (1 << _E) - 1, (1 << (_D - _E)) - 1
_ONE = 1 << _E  # a scalar: one value, no data

# Opcodes of a plain scalar with a fixed-size argument: how many bytes the argument takes.
_FIXED = [-1] * 256
for _op, _size in ((pickle.NONE, 0), (pickle.NEWTRUE, 0), (pickle.NEWFALSE, 0), (pickle.EMPTY_TUPLE, 0),
                   (pickle.BININT1, 1), (pickle.BININT2, 2), (pickle.BININT, 4), (pickle.BINFLOAT, 8)):
    _FIXED[_op[0]] = _size
# Opcodes of data with a length first: (bytes of the length, whether it counts as data).
_SIZED = {pickle.SHORT_BINUNICODE[0]: 1, pickle.SHORT_BINBYTES[0]: 1, pickle.BINUNICODE[0]: 4,
          pickle.BINBYTES[0]: 4, pickle.BINUNICODE8[0]: 8, pickle.BINBYTES8[0]: 8, pickle.BYTEARRAY8[0]: 8,
          pickle.LONG1[0]: 1, pickle.LONG4[0]: 4}
_NAMES = {getattr(pickle, n)[0]: n for n in dir(pickle) if n.isupper() and isinstance(getattr(pickle, n), bytes)
          and len(getattr(pickle, n)) == 1}


def _refuse(why: str) -> Refused:
    return Refused(f"refused: {why}")


def _close(record: list[Any]) -> int:
    """A container taken by its parent, referred to again, or returned: from now on one packed value,
    within the limits."""
    if record[3] is None:
        if record[0] > MAX_VALUES:
            raise _refuse(f"the message decodes into more than {MAX_VALUES:,} values"
                          " (a shared one counts each time it is referenced)")
        if record[1] > MAX_DATA_BYTES:
            raise _refuse(f"the message decodes into more than {MAX_DATA_BYTES >> 20} MiB of data"
                          " (a shared string counts each time it is referenced)")
        if record[2] > MAX_DEPTH:
            raise _refuse(f"the message nests containers more than {MAX_DEPTH} deep")
        record[3] = record[2] << _D | record[0] << _E | record[1]
    return int(record[3])


def _fill(record: Any, items: list[int]) -> None:
    """Add `items` (packed values) to an open container."""
    if record.__class__ is not list or record[3] is not None:
        raise _refuse("a container is changed after it was used (not something pickle.dumps writes)")
    if items:
        total = sum(items)
        record[0] += (total >> _E) & _EMASK
        record[1] += total & _BMASK
        depth = (max(items) >> _D) + 1
        if depth > record[2]:
            record[2] = depth


# One piece (~165 lines): an opcode loop, as pickle's own _Unpickler.load is; a function per opcode would
# add a call per opcode to what is already the boundary's whole cost (bench/pickle_boundary.py).
def scan(data: bytes) -> None:
    """Walk the pickle's opcodes as the unpickler would, building nothing: Refused if the result would
    break a limit, or would need anything but plain data (a class, a function, out-of-band buffers)."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: list[Any] = []
    # Where the stack holds containers not yet taken by a parent (in order): they close when taken.
    open_at: list[int] = []
    push, fixed = stack.append, _FIXED
    end = len(data)
    i = 0
    created = 0  # values made (a memo reference makes none): what the unpickler really allocates
    one = _ONE
    try:
        while True:
            # The limits on what is pending are checked every 4 KiB of opcodes (each op pushes one
            # value at most), not at each one: the scan is the boundary's whole cost per job.
            if len(stack) > MAX_STACK or len(open_at) > MAX_OPEN or created > MAX_VALUES or len(memo) > created:
                if created > MAX_VALUES:
                    raise _refuse(f"the message decodes into more than {MAX_VALUES:,} values")
                if len(memo) > created:
                    raise _refuse("more memo entries than values")
                if len(open_at) > MAX_OPEN:
                    raise _refuse(f"more than {MAX_OPEN:,} containers being filled at once"
                                  " (a nesting bomb, or not something pickle.dumps writes)")
                raise _refuse(f"more than {MAX_STACK:,} values pending at once")
            block = i + 4096
            while i < block:
                op = data[i]
                if op == 0x68:  # BINGET (most opcodes of a submission: its dicts' keys)
                    value = memo[data[i + 1]]
                    if value.__class__ is list:
                        # A container referred to again is finished from here on (pickle.dumps writes a
                        # reference only to a finished one): any later change to it is refused, so what
                        # each reference counted stays true, and a container holding itself is refused.
                        value = _close(value)
                    push(value)
                    i += 2
                elif op == 0x94:  # MEMOIZE
                    memo.append(stack[-1])
                    i += 1
                elif op == 0x8C:  # SHORT_BINUNICODE
                    length = data[i + 1]
                    value = one + length
                    push(value)
                    created += 1
                    i += 2 + length
                    if data[i] == 0x94:  # MEMOIZE: what the pickler writes after every string
                        memo.append(value)
                        i += 1
                elif fixed[op] >= 0:  # None, True, False, (), a number
                    push(one)
                    created += 1
                    i += 1 + fixed[op]
                elif op == 0x7D or op == 0x5D or op == 0x8F:  # EMPTY_DICT, EMPTY_LIST, EMPTY_SET
                    open_at.append(len(stack))
                    value = [1, 0, 1, None]
                    push(value)
                    created += 1
                    i += 1
                    if data[i] == 0x94:
                        memo.append(value)
                        i += 1
                elif op == 0x28:  # MARK
                    if len(marks) >= MAX_DEPTH:
                        raise _refuse(f"the message nests containers more than {MAX_DEPTH} deep")
                    marks.append(len(stack))
                    i += 1
                elif op == 0x75 or op == 0x65 or op == 0x90:  # SETITEMS, APPENDS, ADDITEMS
                    at = marks.pop()
                    while open_at and open_at[-1] >= at:
                        where = open_at.pop()
                        stack[where] = _close(stack[where])
                    items = stack[at:]
                    del stack[at:]
                    if op == 0x75 and len(items) % 2:
                        raise _refuse("a dict item without its value")
                    _fill(stack[-1], items)
                    i += 1
                elif op == 0x73 or op == 0x61:  # SETITEM, APPEND
                    count = 2 if op == 0x73 else 1
                    at = len(stack) - count
                    while open_at and open_at[-1] >= at:
                        where = open_at.pop()
                        stack[where] = _close(stack[where])
                    items = stack[at:]
                    del stack[at:]
                    _fill(stack[-1], items)
                    i += 1
                elif op in _SIZED:  # str, bytes or a long int with its length first
                    width = _SIZED[op]
                    length = int.from_bytes(data[i + 1:i + 1 + width], "little")
                    i += 1 + width + length
                    if i > end:
                        raise _refuse("a value longer than the message")
                    value = one + length
                    push(value)
                    created += 1
                    if data[i] == 0x94:
                        memo.append(value)
                        i += 1
                elif op == 0x74 and marks and not (open_at and open_at[-1] >= marks[-1]):
                    # TUPLE of finished values (a result row of every report): packed here, no record.
                    at = marks.pop()
                    items = stack[at:]
                    del stack[at:]
                    if items:
                        total = sum(items)
                        value = ((max(items) >> _D) + 1) << _D | (((total >> _E) & _EMASK) + 1) << _E | (total & _BMASK)
                        if value >> _D > MAX_DEPTH or (value >> _E) & _EMASK > MAX_VALUES or value & _BMASK > MAX_DATA_BYTES:
                            _close([((value >> _E) & _EMASK), value & _BMASK, value >> _D, None])  # refuses, naming the limit
                    else:
                        value = one
                    push(value)
                    created += 1
                    i += 1
                    if data[i] == 0x94:
                        memo.append(value)
                        i += 1
                elif op == 0x85 or op == 0x86 or op == 0x87 or op == 0x74 or op == 0x91 or op == 0x6C or op == 0x64:
                    # TUPLE1/2/3 take the top values, TUPLE, FROZENSET, LIST, DICT those above the mark
                    at = len(stack) - (op - 0x84) if 0x85 <= op <= 0x87 else marks.pop()
                    if at < 0:
                        raise _refuse("a tuple of missing values")
                    while open_at and open_at[-1] >= at:
                        where = open_at.pop()
                        stack[where] = _close(stack[where])
                    items = stack[at:]
                    del stack[at:]
                    if op == 0x64 and len(items) % 2:
                        raise _refuse("a dict item without its value")
                    record = [1, 0, 1, None]
                    _fill(record, items)
                    created += 1
                    if op == 0x6C or op == 0x64:  # a list or dict may still be filled
                        open_at.append(len(stack))
                        push(record)
                    else:
                        push(_close(record))
                    i += 1
                elif op == 0x6A:  # LONG_BINGET
                    value = memo[int.from_bytes(data[i + 1:i + 5], "little")]
                    push(_close(value) if value.__class__ is list else value)
                    i += 5
                elif op == 0x71 or op == 0x72:  # BINPUT, LONG_BINPUT
                    if op == 0x71:
                        index = data[i + 1]
                        i += 2
                    else:
                        index = int.from_bytes(data[i + 1:i + 5], "little")
                        i += 5
                    # The unpickler sizes its memo by the largest index: only the next one, or one in use.
                    if index > len(memo):
                        raise _refuse("a memo index out of sequence")
                    if index == len(memo):
                        memo.append(stack[-1])
                    else:
                        memo[index] = stack[-1]
                elif op == 0x95:  # FRAME: framing only, the opcodes inside are read as they come
                    i += 9
                elif op == 0x80:  # PROTO
                    if data[i + 1] < 2:
                        raise _refuse("pickle protocols 0 and 1 are not read (every Python 3 sends 2 or newer)")
                    i += 2
                elif op == 0x2E:  # STOP
                    if not stack or marks:
                        raise _refuse("the message ends inside a container")
                    top = stack[-1]
                    top = _close(top) if top.__class__ is list else top
                    if created > MAX_VALUES or len(memo) > created:
                        raise _refuse(f"the message decodes into more than {MAX_VALUES:,} values")
                    if (top & _BMASK) > MAX_DATA_BYTES:  # a lone string: no container checked it
                        raise _refuse(f"the message decodes into more than {MAX_DATA_BYTES >> 20} MiB of data")
                    return
                elif op == 0x63 or op == 0x93:  # GLOBAL, STACK_GLOBAL
                    raise _ClassReference("refused: the master accepts plain data only, not a class or function")
                else:
                    name = _NAMES.get(op)
                    raise _refuse(f"the master accepts plain data only, not pickle's {name or hex(op)} opcode")
    except IndexError:
        raise _refuse("the message is cut short or malformed") from None
