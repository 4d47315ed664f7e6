"""The hash chain over the global event log: what `continuum seal` writes, `continuum verify`
recomputes, and an auditor can recompute from `continuum log export` alone (docs/verify.md).

The hash of the event at position ``p`` is the SHA-256 (lowercase hex) of the bytes

    b"continuum-chain-v1\\n" + previous + b"\\n" + str(p) + b"\\n" + wire

where ``previous`` is the hash at ``p - 1`` as 64 ASCII hex characters (``GENESIS``, 64 zeros,
for position 1), ``str(p)`` is the position in ASCII decimal, and ``wire`` is the event's
canonical wire form *with its position* (``continuum_events.wire.canonical_json``: exactly one
line of ``continuum log export`` without its trailing newline). Each hash therefore covers the
event's content, its place in the log and, through ``previous``, every event before it: altering,
removing or reordering any event changes every hash from that position on.
"""

from __future__ import annotations

import hashlib
import re

#: Version tag at the start of every hashed input; a new layout would get a new tag.
DOMAIN = b"continuum-chain-v1\n"
#: The "previous hash" of position 1.
GENESIS = "0" * 64

_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_chain_hash(value: str) -> bool:
    """True if `value` has the form of a chain hash (64 lowercase hex characters)."""
    return _HEX64.fullmatch(value) is not None


def chain_hash(previous: str, position: int, wire: bytes) -> str:
    """The chain hash of the event at `position` whose wire bytes are `wire`, following the
    hash `previous` of position - 1 (GENESIS for position 1)."""
    if not is_chain_hash(previous):
        raise ValueError(f"previous hash must be 64 lowercase hex characters, got {previous!r}")
    if isinstance(position, bool) or not isinstance(position, int) or position < 1:
        raise ValueError(f"position must be a positive integer, got {position!r}")
    digest = hashlib.sha256(DOMAIN)
    digest.update(previous.encode("ascii"))
    digest.update(b"\n")
    digest.update(str(position).encode("ascii"))
    digest.update(b"\n")
    digest.update(wire)
    return digest.hexdigest()
