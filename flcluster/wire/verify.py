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

Any violation raises :class:`SchemaError`, whose :attr:`~SchemaError.reason` is the answer the original
gives the device ("The schema of RequestFLJob is invalid.") and whose :attr:`~SchemaError.detail` says what
exactly was wrong and where.
"""

from __future__ import annotations

import enum
import struct
from typing import NoReturn

import attrs

from flcluster.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_OBJECTS",
    "Field",
    "Kind",
    "SchemaError",
    "Table",
    "verify",
]

#: Tables nested deeper than this are refused (the device schema nests 4 deep: ResponseFLJob > FLPlan >
#: CipherPublicParams > PWParams).
DEFAULT_MAX_DEPTH = 16
#: At most this many objects (tables, strings, vectors) are visited in one body.
DEFAULT_MAX_OBJECTS = 65_536
#: FlatBuffers offsets are signed 32-bit in the C++ verifier: nothing may reach 2 GiB.
_MAX_BUFFER = 2**31

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")


class SchemaError(ProtocolError):
    """A FlatBuffers body does not match the schema it was decoded as, or breaks one of its limits.

    Attributes:
        reason: The answer for the peer, in the original's words where it has them (for example
            ``"The schema of RequestFLJob is invalid."``).
        detail: What exactly was wrong and where, for logs and for the curious peer.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} {detail}".rstrip())
        self.reason = reason
        self.detail = detail


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


def verify(
    body: bytes,
    root: Table,
    *,
    reason: str | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_objects: int = DEFAULT_MAX_OBJECTS,
) -> None:
    """Prove that ``body`` is a well-formed FlatBuffer whose root is a ``root`` table (module docstring).

    A file identifier, if the body carries one, is neither required nor checked, as in the original.

    Args:
        body: The untrusted bytes (any C-contiguous bytes-like object).
        root: The description of the root table.
        reason: The :attr:`SchemaError.reason` to raise with; by default "The schema of <root> is invalid.".
        max_depth: Nesting limit for tables.
        max_objects: Budget of tables, strings and vectors visited.

    Raises:
        SchemaError: The body is malformed, is not a ``root`` table, or breaks a limit of the description.
    """
    _Walk(body, reason or f"The schema of {root.name} is invalid.", max_depth, max_objects).root(root)


class _Walk:
    """One verification pass over one buffer."""

    def __init__(self, body: bytes, reason: str, max_depth: int, max_objects: int) -> None:
        self.buf = memoryview(body).cast("B")
        self.size = len(self.buf)
        self.reason = reason
        self.max_depth = max_depth
        self.objects_left = max_objects

    def fail(self, detail: str) -> NoReturn:
        raise SchemaError(self.reason, detail)

    # -- primitives ------------------------------------------------------------------------------------------

    def need(self, pos: int, length: int, align: int, what: str) -> None:
        """``length`` bytes at ``pos`` lie in the buffer, and ``pos`` is a multiple of ``align``."""
        if pos < 0 or length < 0 or pos + length > self.size:
            self.fail(f"{what}: {length} bytes at offset {pos} do not fit in the {self.size}-byte body")
        if pos % align:
            self.fail(f"{what}: offset {pos} is not aligned to {align} bytes")

    def spend(self, what: str) -> None:
        self.objects_left -= 1
        if self.objects_left < 0:
            self.fail(f"{what}: the body holds more objects than the verifier's budget allows")

    def follow(self, pos: int, what: str) -> int:
        """Read the forward offset stored at ``pos`` and return the position it points to."""
        self.need(pos, 4, 4, what)
        offset: int = _U32.unpack_from(self.buf, pos)[0]
        if offset == 0 or offset >= _MAX_BUFFER:
            self.fail(f"{what}: offset {offset} at {pos} is not a forward offset")
        target = pos + offset
        if target >= self.size:
            self.fail(f"{what}: offset {offset} at {pos} points past the end of the {self.size}-byte body")
        return target

    def vector_length(self, pos: int, elem_size: int, what: str) -> int:
        """Check a vector's length prefix and extent; return its number of elements."""
        self.spend(what)
        self.need(pos, 4, 4, what)
        length: int = _U32.unpack_from(self.buf, pos)[0]
        if length * max(elem_size, 1) >= _MAX_BUFFER:
            self.fail(f"{what}: declared length {length} is too large")
        self.need(pos + 4, length * elem_size, 1, f"{what} (length {length})")
        return length

    # -- objects ---------------------------------------------------------------------------------------------

    def root(self, table: Table) -> None:
        if self.size >= _MAX_BUFFER:
            self.fail(f"the body is {self.size} bytes; FlatBuffers stop at 2 GiB")
        self.table(self.follow(0, f"root offset of {table.name}"), table, 1, table.name)

    def table(self, pos: int, table: Table, depth: int, path: str) -> None:
        if depth > self.max_depth:
            self.fail(f"{path}: tables nest deeper than {self.max_depth}")
        self.spend(path)
        self.need(pos, 4, 4, f"{path}: table")
        vtable = pos - _I32.unpack_from(self.buf, pos)[0]
        self.need(vtable, 4, 2, f"{path}: vtable")
        vsize, tsize = _U16.unpack_from(self.buf, vtable)[0], _U16.unpack_from(self.buf, vtable + 2)[0]
        if vsize < 4 or vsize % 2:
            self.fail(f"{path}: vtable size {vsize} is not an even number of at least 4 bytes")
        self.need(vtable, vsize, 2, f"{path}: vtable")
        if tsize < 4:
            self.fail(f"{path}: table size {tsize} is smaller than its 4-byte header")
        self.need(pos, tsize, 4, f"{path}: table")
        for slot, field in enumerate(table.fields):
            entry = 4 + 2 * slot
            if entry >= vsize:
                break  # this and every later field are absent: written by an older schema
            voffset: int = _U16.unpack_from(self.buf, vtable + entry)[0]
            if voffset == 0 or field.kind is Kind.UNREAD:
                continue
            self.field(pos, voffset, tsize, field, depth, f"{path}.{field.name}")

    def field(self, pos: int, voffset: int, tsize: int, field: Field, depth: int, path: str) -> None:
        width = field.size if field.kind is Kind.SCALAR else 4
        if voffset < 4 or voffset + width > tsize:
            self.fail(f"{path}: field at {voffset} lies outside its {tsize}-byte table")
        where = pos + voffset
        self.need(where, width, width, path)
        if field.kind is Kind.SCALAR:
            return
        target = self.follow(where, path)
        match field.kind:
            case Kind.STRING:
                self.string(target, field.max_len, path)
            case Kind.VECTOR:
                length = self.vector_length(target, field.size, path)
                self.limit(length, field.max_len, "elements", path)
            case Kind.TABLE:
                assert field.table is not None
                self.table(target, field.table, depth + 1, path)
            case Kind.TABLE_VECTOR:
                assert field.table is not None
                for i, element in self.offsets(target, field, path):
                    self.table(element, field.table, depth + 1, f"{path}[{i}]")
            case Kind.STRING_VECTOR:
                for i, element in self.offsets(target, field, path):
                    self.string(element, field.max_item_len, f"{path}[{i}]")
            case _:  # pragma: no cover - SCALAR and UNREAD are handled above
                raise AssertionError(field.kind)

    def offsets(self, pos: int, field: Field, path: str) -> list[tuple[int, int]]:
        """Check a vector of offsets; return (index, target) for each element."""
        length = self.vector_length(pos, 4, path)
        self.limit(length, field.max_len, "elements", path)
        return [(i, self.follow(pos + 4 + 4 * i, f"{path}[{i}]")) for i in range(length)]

    def string(self, pos: int, max_len: int | None, path: str) -> None:
        length = self.vector_length(pos, 1, path)
        start = pos + 4
        self.need(start + length, 1, 1, f"{path}: string terminator")
        if self.buf[start + length] != 0:
            self.fail(f"{path}: string of {length} bytes is not NUL-terminated")
        self.limit(length, max_len, "bytes", path)
        try:
            str(self.buf[start : start + length], "utf-8")
        except UnicodeDecodeError as exc:
            self.fail(f"{path}: string is not valid UTF-8 ({exc.reason} at byte {exc.start})")

    def limit(self, length: int, max_len: int | None, unit: str, path: str) -> None:
        if max_len is not None and length > max_len:
            self.fail(f"{path}: {length} {unit}, at most {max_len} allowed")
