"""A bounds-and-shape verifier for FlatBuffers bodies that arrive from untrusted peers.

The Python FlatBuffers runtime has no verifier: its accessors trust every offset they read, so a hostile or
truncated body makes them raise arbitrary errors (``IndexError``, ``struct.error``, ``UnicodeDecodeError``)
or, worse, quietly read unrelated bytes. The original server runs the C++ ``flatbuffers::Verifier`` on every
request before touching it. :func:`verify` does the same job in Python, so that a decoder may read a
verified body with the generated accessors and never meet anything but well-formed data
(spec/device-protocol.md, "Wire schema").

Theory of operation
-------------------
A FlatBuffer is a graph of *objects* laid out in one byte buffer: tables, strings and vectors, linked by
unsigned 32-bit offsets that always point forward from where they are stored. A table starts with a signed
32-bit offset to its *vtable*; the vtable is a list of 16-bit words: its own size, the table's inline size,
then one entry per field giving where the field lives inside the table (0 = absent, so the reader uses the
default). A field is known only by its position (slot) in its table.

The verifier walks this graph from the root, guided by a compact description of each table (:class:`Table`, a
tuple of :class:`Field` in slot order). For each object it proves, before anyone reads it:

- **root**: the buffer holds the 4-byte root offset and the offset lands inside the buffer;
- **table**: the soffset is in bounds and 4-aligned; the vtable is in bounds, 2-aligned, at least 4 bytes,
  of even size; the table's inline size is at least 4 and lies in the buffer;
- **every described field that is present**: its vtable entry points inside the table's inline part (past
  the soffset), the field's bytes fit in the buffer and are aligned to their size (offsets to 4);
- **string**: the length prefix is in bounds and 4-aligned, the bytes and the NUL terminator lie in the
  buffer, the terminator is NUL, the bytes are valid UTF-8, and the length is within the field's limit;
- **vector**: the length prefix is in bounds and 4-aligned, length × element size stays under 2 GiB and
  within the buffer, and the length is within the field's limit;
- **nested table / vector of tables / vector of strings**: every element is checked recursively.

Two budgets bound the work a hostile body can cause: a nesting **depth limit** (tables within tables; the
device schema needs 4) and a **total-object budget** (tables, strings and vectors visited, shared objects
counted each time they are reached). Declared lengths are checked against the buffer before anything is
allocated, so a body claiming a vector of 2**31 floats costs a few comparisons.

The checks are those of the C++ verifier, plus UTF-8 validity, the table-inline-size checks and the length
limits the device schema declares; any body a FlatBuffers builder produces within those limits passes.
Fields a description does not list, or lists as :attr:`Kind.UNREAD`, are never checked, so a decoder must read
only what it has described.

What it proved comes back as a :class:`Verified` per table: for every described field that is present, its
position (scalars), its decoded text (strings), the position and element count of its elements (vectors of
scalars), or the :class:`Verified` of its tables. A decoder may read the body through it, with no generated
accessor and no second walk; vectors of scalars are only bounds-checked, never read element by element.
The walk is compiled once per :class:`Table` into plain tuples, reads each vtable's entries with one
``unpack_from``, and builds no message and no path unless something is wrong (the path is assembled as the
failure propagates out).

Any violation raises :class:`SchemaError`, whose :attr:`~SchemaError.reason` is the answer the original
gives the device ("The schema of RequestFLJob is invalid.") and whose :attr:`~SchemaError.detail` says what
exactly was wrong and where.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import attrs

from flcluster.errors import SchemaError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_OBJECTS",
    "Field",
    "Kind",
    "SchemaError",
    "Table",
    "Verified",
    "verify",
]

#: Tables nested deeper than this are refused (the device schema nests 4 deep: ResponseFLJob > FLPlan >
#: CipherPublicParams > PWParams).
DEFAULT_MAX_DEPTH = 16
#: At most this many objects (tables, strings, vectors) are visited in one body.
DEFAULT_MAX_OBJECTS = 65_536
#: FlatBuffers offsets are signed 32-bit in the C++ verifier: nothing may reach 2 GiB.
_MAX_BUFFER = 2**31

_U16_PAIR = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")


class Kind(enum.Enum):
    """What a table field holds, as far as the verifier is concerned."""

    SCALAR = "scalar"
    STRING = "string"
    VECTOR = "vector"  # vector of scalars
    TABLE = "table"
    TABLE_VECTOR = "table vector"
    STRING_VECTOR = "string vector"
    UNREAD = "unread"  # declared in the schema, never read by flcluster, never checked


@attrs.frozen
class Field:
    """One slot of a table description; its slot is its position in :attr:`Table.fields`.

    Attributes:
        name: The schema's field name (for messages).
        kind: What the field holds.
        size: Width in bytes of a scalar, or of one element of a scalar vector.
        table: The element or child table description, for ``TABLE`` and ``TABLE_VECTOR``.
        max_len: Limit on a string's length in bytes, or on a vector's number of elements (``None``: none).
        max_item_len: Limit in bytes on each string of a ``STRING_VECTOR``.
    """

    name: str
    kind: Kind
    size: int = 0
    table: Table | None = None
    max_len: int | None = None
    max_item_len: int | None = None

    @classmethod
    def scalar(cls, name: str, size: int) -> Field:
        """A scalar (bool, byte, enum, int, float) of ``size`` bytes."""
        return cls(name, Kind.SCALAR, size=size)

    @classmethod
    def string(cls, name: str, max_len: int | None = None) -> Field:
        """A UTF-8 string, at most ``max_len`` bytes long."""
        return cls(name, Kind.STRING, max_len=max_len)

    @classmethod
    def vector(cls, name: str, size: int, max_len: int | None = None) -> Field:
        """A vector of scalars of ``size`` bytes each, at most ``max_len`` of them."""
        return cls(name, Kind.VECTOR, size=size, max_len=max_len)

    @classmethod
    def child(cls, name: str, table: Table) -> Field:
        """A nested table."""
        return cls(name, Kind.TABLE, table=table)

    @classmethod
    def tables(cls, name: str, table: Table, max_len: int | None = None) -> Field:
        """A vector of tables, at most ``max_len`` of them."""
        return cls(name, Kind.TABLE_VECTOR, table=table, max_len=max_len)

    @classmethod
    def strings(cls, name: str, max_len: int | None = None, max_item_len: int | None = None) -> Field:
        """A vector of strings: at most ``max_len`` of them, each at most ``max_item_len`` bytes."""
        return cls(name, Kind.STRING_VECTOR, max_len=max_len, max_item_len=max_item_len)

    @classmethod
    def unread(cls, name: str) -> Field:
        """A field flcluster never reads, so never checks."""
        return cls(name, Kind.UNREAD)


@attrs.frozen
class Table:
    """The description of one table: its fields in slot order.

    Slots after the last listed field are never read and never checked, so a description may stop early.
    """

    name: str
    fields: tuple[Field, ...]
    # The fields as plain tuples, built once, for the walk (no attribute look-ups per field per body).
    _slots: tuple[_Slot, ...] = attrs.field(init=False, repr=False, eq=False, hash=False)
    _entries: struct.Struct = attrs.field(init=False, repr=False, eq=False, hash=False)
    _kinds: tuple[Kind, ...] = attrs.field(init=False, repr=False, eq=False, hash=False)

    def __attrs_post_init__(self) -> None:
        slots = tuple(
            (
                _CODES[f.kind],
                f.size if f.kind is Kind.SCALAR else 4,
                max(f.size, 1),
                _MAX_BUFFER if f.max_len is None else f.max_len,
                _MAX_BUFFER if f.max_item_len is None else f.max_item_len,
                f.table,
                f.name,
            )
            for f in self.fields
        )
        object.__setattr__(self, "_slots", slots)
        object.__setattr__(self, "_entries", struct.Struct(f"<{len(slots)}H"))
        object.__setattr__(self, "_kinds", tuple(f.kind for f in self.fields))


# A compiled field: (kind code, inline width, element size (>= 1), max_len, max_item_len, child table, name).
_Slot = tuple[int, int, int, int, int, "Table | None", str]
_SCALAR, _STRING, _VECTOR, _TABLE, _TABLE_VECTOR, _STRING_VECTOR, _UNREAD = range(7)
_CODES = {
    Kind.SCALAR: _SCALAR,
    Kind.STRING: _STRING,
    Kind.VECTOR: _VECTOR,
    Kind.TABLE: _TABLE,
    Kind.TABLE_VECTOR: _TABLE_VECTOR,
    Kind.STRING_VECTOR: _STRING_VECTOR,
    Kind.UNREAD: _UNREAD,
}


class Verified:
    """What :func:`verify` found in one table of a verified body, for a decoder to read without re-checking.

    One value per described slot: ``None`` when the field is absent (or :attr:`Kind.UNREAD`); otherwise, by
    kind, the scalar's position in the body, the decoded string, ``(start, count)`` of a scalar vector's
    elements, the child's :class:`Verified`, a tuple of them, or a tuple of strings. The accessors check that
    a slot is read as the kind it was described as, so a decoder cannot read what was not verified.
    """

    __slots__ = ("_body", "_table", "_values")

    def __init__(self, body: bytes, table: Table, values: list[object]) -> None:
        self._body = body
        self._table = table
        self._values = values

    def _get(self, slot: int, kind: Kind) -> object:
        if self._table._kinds[slot] is not kind:
            raise TypeError(f"{self._table.name} slot {slot} was verified as {self._table.fields[slot].kind}")
        return self._values[slot]

    def scalar(self, slot: int, fmt: struct.Struct, default: float) -> Any:
        """The scalar in ``slot`` read with ``fmt`` (as wide as the described field), or ``default``."""
        where = self._get(slot, Kind.SCALAR)
        if fmt.size != self._table.fields[slot].size:
            raise TypeError(f"{self._table.name} slot {slot} is {self._table.fields[slot].size} bytes wide")
        assert where is None or isinstance(where, int)
        return default if where is None else fmt.unpack_from(self._body, where)[0]

    def string(self, slot: int) -> str | None:
        """The string in ``slot``, or ``None`` when absent."""
        value = self._get(slot, Kind.STRING)
        assert value is None or isinstance(value, str)
        return value

    def vector(self, slot: int) -> tuple[int, int] | None:
        """``(position of the first element, count)`` of the scalar vector in ``slot``, or ``None``."""
        value = self._get(slot, Kind.VECTOR)
        assert value is None or isinstance(value, tuple)
        return value

    def child(self, slot: int) -> Verified | None:
        """The nested table in ``slot``, or ``None`` when absent."""
        value = self._get(slot, Kind.TABLE)
        assert value is None or isinstance(value, Verified)
        return value

    def tables(self, slot: int) -> tuple[Verified, ...] | None:
        """The vector of tables in ``slot``, or ``None`` when absent."""
        value = self._get(slot, Kind.TABLE_VECTOR)
        assert value is None or isinstance(value, tuple)
        return value

    def strings(self, slot: int) -> tuple[str, ...] | None:
        """The vector of strings in ``slot``, or ``None`` when absent."""
        value = self._get(slot, Kind.STRING_VECTOR)
        assert value is None or isinstance(value, tuple)
        return value


def verify(
    body: bytes,
    root: Table,
    *,
    reason: str | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_objects: int = DEFAULT_MAX_OBJECTS,
) -> Verified:
    """Prove that ``body`` is a well-formed FlatBuffer whose root is a ``root`` table (module docstring).

    A file identifier, if the body carries one, is neither required nor checked, as in the original.

    Args:
        body: The untrusted bytes (any C-contiguous bytes-like object).
        root: The description of the root table.
        reason: The :attr:`SchemaError.reason` to raise with; by default "The schema of <root> is invalid.".
        max_depth: Nesting limit for tables.
        max_objects: Budget of tables, strings and vectors visited.

    Returns:
        Where the root's described fields are (its strings already decoded), for reading without re-checking.

    Raises:
        SchemaError: The body is malformed, is not a ``root`` table, or breaks a limit of the description.
    """
    walk = _Walk(body, max_depth, max_objects)
    try:
        return walk.root(root)
    except _Bad as bad:
        raise SchemaError(reason or f"The schema of {root.name} is invalid.", bad.detail()) from None


class _Bad(Exception):
    """A violation found in the walk; each enclosing object prepends its name to the path on the way out."""

    def __init__(self, tail: str) -> None:
        super().__init__(tail)
        self.tail = tail
        self.path: list[str] = []  # innermost first

    def detail(self) -> str:
        return "".join(reversed(self.path)) + self.tail


class _Walk:
    """One verification pass over one buffer.

    Failures raise :class:`_Bad` with the message after the path; the path is only built on the way out of a
    failure, so a good body costs no string formatting.
    """

    __slots__ = ("body", "buf", "max_depth", "objects_left", "size")

    def __init__(self, body: bytes, max_depth: int, max_objects: int) -> None:
        self.body = body
        self.buf = memoryview(body).cast("B")
        self.size = len(self.buf)
        self.max_depth = max_depth
        self.objects_left = max_objects

    # -- primitives ------------------------------------------------------------------------------------------

    def need(self, pos: int, length: int, align: int, what: str) -> None:
        """``length`` bytes at ``pos`` lie in the buffer, and ``pos`` is a multiple of ``align``."""
        if pos < 0 or length < 0 or pos + length > self.size:
            raise _Bad(f"{what}: {length} bytes at offset {pos} do not fit in the {self.size}-byte body")
        if pos % align:
            raise _Bad(f"{what}: offset {pos} is not aligned to {align} bytes")

    def spend(self) -> None:
        self.objects_left -= 1
        if self.objects_left < 0:
            raise _Bad(": the body holds more objects than the verifier's budget allows")

    # The hot checks below are written inline as ``if <out of bounds or misaligned>: self.need(...)``, so a
    # good body pays for a comparison, not a call (nor a message); ``need`` then raises with the message.

    def follow(self, pos: int, what: str = "") -> int:
        """Read the forward offset stored at ``pos`` (4-aligned, in bounds) and return where it points."""
        offset: int = _U32.unpack_from(self.buf, pos)[0]
        if offset == 0 or offset >= _MAX_BUFFER:
            raise _Bad(f"{what}: offset {offset} at {pos} is not a forward offset")
        target = pos + offset
        if target >= self.size:
            raise _Bad(f"{what}: offset {offset} at {pos} points past the end of the {self.size}-byte body")
        return target

    def vector_length(self, pos: int, elem_size: int, max_len: int, unit: str) -> int:
        """Check a vector's length prefix, extent and limit; return its number of elements."""
        self.objects_left -= 1
        if self.objects_left < 0:
            self.spend()
        if pos < 0 or pos + 4 > self.size or pos & 3:
            self.need(pos, 4, 4, "")
        length: int = _U32.unpack_from(self.buf, pos)[0]
        if length * elem_size >= _MAX_BUFFER:
            raise _Bad(f": declared length {length} is too large")
        if pos + 4 + length * elem_size > self.size:
            self.need(pos + 4, length * elem_size, 1, f" (length {length})")
        if length > max_len:
            raise _Bad(f": {length} {unit}, at most {max_len} allowed")
        return length

    # -- objects ---------------------------------------------------------------------------------------------

    def root(self, table: Table) -> Verified:
        if self.size >= _MAX_BUFFER:
            raise _Bad(f"the body is {self.size} bytes; FlatBuffers stop at 2 GiB")
        what = f"root offset of {table.name}"
        self.need(0, 4, 4, what)
        target = self.follow(0, what)
        try:
            return self.table(target, table, 1)
        except _Bad as bad:
            bad.path.append(table.name)
            raise

    def table(self, pos: int, table: Table, depth: int) -> Verified:
        if depth > self.max_depth:
            raise _Bad(f": tables nest deeper than {self.max_depth}")
        self.objects_left -= 1
        if self.objects_left < 0:
            self.spend()
        buf, size = self.buf, self.size
        if pos < 0 or pos + 4 > size or pos & 3:
            self.need(pos, 4, 4, ": table")
        vtable = pos - _I32.unpack_from(buf, pos)[0]
        if vtable < 0 or vtable + 4 > size or vtable & 1:
            self.need(vtable, 4, 2, ": vtable")
        vsize, tsize = _U16_PAIR.unpack_from(buf, vtable)
        if vsize < 4 or vsize % 2:
            raise _Bad(f": vtable size {vsize} is not an even number of at least 4 bytes")
        if vtable + vsize > size:
            self.need(vtable, vsize, 2, ": vtable")
        if tsize < 4:
            raise _Bad(f": table size {tsize} is smaller than its 4-byte header")
        if pos + tsize > size:
            self.need(pos, tsize, 4, ": table")
        slots = table._slots
        if 4 + 2 * len(slots) <= vsize:
            entries = table._entries.unpack_from(buf, vtable + 4)
        else:  # fields past the vtable's end are absent: written by an older schema
            entries = struct.unpack_from(f"<{(vsize - 4) // 2}H", buf, vtable + 4)
        values: list[object] = []
        for (code, width, elem, max_len, max_item_len, child, name), voffset in zip(
            slots, entries, strict=False
        ):
            if voffset == 0 or code == _UNREAD:
                values.append(None)
                continue
            try:
                # The table's inline part lies in the body (checked above), so only the alignment is left.
                if voffset < 4 or voffset + width > tsize:
                    raise _Bad(f": field at {voffset} lies outside its {tsize}-byte table")
                where = pos + voffset
                if where % width:
                    self.need(where, width, width, "")
                if code == _SCALAR:
                    values.append(where)
                    continue
                target = self.follow(where)
                if code == _STRING:
                    values.append(self.string(target, max_len))
                elif code == _VECTOR:
                    values.append((target + 4, self.vector_length(target, elem, max_len, "elements")))
                elif code == _TABLE:
                    assert child is not None
                    values.append(self.table(target, child, depth + 1))
                else:
                    values.append(self.elements(target, code, child, max_len, max_item_len, depth))
            except _Bad as bad:
                bad.path.append(f".{name}")
                raise
        values.extend([None] * (len(slots) - len(values)))
        return Verified(self.body, table, values)

    def elements(
        self, pos: int, code: int, child: Table | None, max_len: int, max_item_len: int, depth: int
    ) -> tuple[Any, ...]:
        """Check a vector of tables or strings and every element; return what each element holds."""
        length = self.vector_length(pos, 4, max_len, "elements")
        out: list[Any] = []
        at = pos + 4
        for i, offset in enumerate(struct.unpack_from(f"<{length}I", self.buf, at)):
            try:
                if offset == 0 or offset >= _MAX_BUFFER:
                    raise _Bad(f": offset {offset} at {at} is not a forward offset")
                target = at + offset
                if target >= self.size:
                    raise _Bad(f": offset {offset} at {at} points past the end of the {self.size}-byte body")
                if code == _TABLE_VECTOR:
                    assert child is not None
                    out.append(self.table(target, child, depth + 1))
                else:
                    out.append(self.string(target, max_item_len))
            except _Bad as bad:
                bad.path.append(f"[{i}]")
                raise
            at += 4
        return tuple(out)

    def string(self, pos: int, max_len: int) -> str:
        self.objects_left -= 1
        if self.objects_left < 0:
            self.spend()
        buf, size = self.buf, self.size
        if pos < 0 or pos + 4 > size or pos & 3:
            self.need(pos, 4, 4, "")
        length: int = _U32.unpack_from(buf, pos)[0]
        if length >= _MAX_BUFFER:
            raise _Bad(f": declared length {length} is too large")
        start = pos + 4
        end = start + length
        if end + 1 > size:
            self.need(start, length, 1, f" (length {length})")
            self.need(end, 1, 1, ": string terminator")
        if buf[end] != 0:
            raise _Bad(f": string of {length} bytes is not NUL-terminated")
        if length > max_len:
            raise _Bad(f": {length} bytes, at most {max_len} allowed")
        try:
            return str(self.buf[start:end], "utf-8")
        except UnicodeDecodeError as exc:
            raise _Bad(f": string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
