"""The protobuf wire-format primitives the hand-framed messages need: varints, the tag of a
length-delimited field, and finding one such field in a serialised message without parsing the rest
(so a large bytes field is read in place, never copied through protobuf)."""

from __future__ import annotations

LEN = 2  # wire type of bytes and messages


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_tag(number: int) -> bytes:
    """The key of length-delimited field `number`."""
    return varint(number << 3 | LEN)


def length_prefixed(number: int, size: int) -> bytes:
    """Key and length of a length-delimited field `number` whose `size` value bytes follow."""
    return field_tag(number) + varint(size)


def read_varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def split_field(buf, start: int, end: int, field_number: int) -> tuple[tuple[int, int] | None, bytes]:
    """Find the one length-delimited field `field_number` of the message buf[start:end].

    Returns (span of its value, or None; every other field's raw bytes, for the generated
    parser). A message in which the field repeats (legal, merged by protobuf) is refused
    here; the caller falls back to the generated parser.
    """
    found, rest, pos = None, [], start
    while pos < end:
        field_start = pos
        key, pos = read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == LEN:
            length, value_start = read_varint(buf, pos)
            pos = value_start + length
            if number == field_number:
                if found is not None:
                    raise ValueError("field repeats")
                found = (value_start, pos)
                continue
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        rest.append(bytes(buf[field_start:pos]))
    if pos != end:
        raise ValueError("truncated message")
    return found, b"".join(rest)
