"""Authentication over the group's shared secret (sans-I/O): the address
records of the rendezvous, the per-connection handshake and its session keys.

Theory of operation
-------------------
Everything is keyed by the ``auth_token`` (UTF-8 bytes); nothing here ever
puts the token itself on the wire or in the store. The attacker considered
does not hold the token but may read and rewrite the rendezvous store (torch's
``TCPStore`` has no credentials) and relay, drop, reorder or inject bytes on
any connection.

**Records, bound to the run.** Each worker publishes a record (its name, rank,
addresses, host id and a fresh random ``nonce``) with :func:`record_mac`, a MAC
over the whole record and the group's key prefix; a rewritten record fails
that MAC. A record *replayed* from an earlier run carries a valid MAC, so the
group then agrees on the run: each worker hashes every record it read (its
own as it wrote it, not as the store returns it) into :func:`run_id` and
publishes :func:`confirm_mac` of that id; every worker checks every other's
confirmation. The ids, and so the confirmations, agree only when every worker
read exactly the records the others wrote in this run: a replayed, rewritten
or withheld record, or a store that shows workers different records, fails
``init_rpc`` with :class:`AuthenticationError` on every worker. An attacker
who controls the store can at most keep the group from starting.

**Handshake.** Every connection starts with a mutual challenge-response keyed
by the run key (:func:`run_key`, derived from the token and the run id) and
bound to the identity of the accepting worker (``server``: its rank), so a
relay can neither reuse an exchange of another run nor splice a connection to
another worker (the client learns at step 2 that it reached the worker it
meant)::

    client -> server   b"ARPA" version u8, client nonce cn (32 bytes)
    server -> client   server nonce sn (32), MAC(k, b"S" + cn + sn + server)
    client -> server   MAC(k, b"C" + sn + cn + server)

``MAC`` is HMAC-SHA256; each side checks the other's in constant time (a
mismatch is :class:`AuthenticationError`). Both sides then derive one session
key per direction, ``MAC(k, b"K c2s" + ...)`` and ``MAC(k, b"K s2c" + ...)``,
which :class:`~aiorpc_autograd.wire.FrameMac` uses to authenticate every
frame of that direction (see docs/PROTOCOL.md §9.1).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Sequence

from .errors import AuthenticationError, ProtocolError

__all__ = [
    "AUTH_MAGIC",
    "VERSION",
    "ClientHandshake",
    "ServerHandshake",
    "confirm_mac",
    "record_mac",
    "run_id",
    "run_key",
]

AUTH_MAGIC = b"ARPA"
VERSION = 2  # 2: run-bound, server-bound exchange with per-direction session keys
_NONCE = 32
_MAC = 32
_U32 = struct.Struct("<I")


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def record_mac(token: str, group: str, record: bytes) -> bytes:
    """The MAC of an address record (its packed fields, nonce included) of ``group``."""
    return _mac(token.encode(), b"aiorpc record\0", group.encode(), b"\0", record)


def run_id(group: str, records: Sequence[bytes]) -> bytes:
    """The identity of this run of ``group``: a hash of every worker's record, by rank."""
    h = hashlib.sha256(b"aiorpc run\0" + group.encode() + b"\0")
    for record in records:
        h.update(_U32.pack(len(record)))
        h.update(record)
    return h.digest()


def confirm_mac(token: str, run: bytes, rank: int) -> bytes:
    """Worker ``rank``'s confirmation that it saw the run ``run``."""
    return _mac(token.encode(), b"aiorpc confirm\0", run, str(rank).encode())


def run_key(token: str, run: bytes) -> bytes:
    """The key every handshake of the run ``run`` is keyed with."""
    return _mac(token.encode(), b"aiorpc run key\0", run)


class _Handshake:
    def __init__(self, key: bytes, server: bytes) -> None:
        self._key = key
        self._server = server
        self._buf = bytearray()
        self.done = False
        self.outgoing = bytearray()  # bytes to send; the caller drains it
        # (send, receive) session keys of this side, once done.
        self.session_keys: tuple[bytes, bytes] | None = None

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _derive(self, cn: bytes, sn: bytes, client: bool) -> None:
        c2s = _mac(self._key, b"K c2s", cn, sn, self._server)
        s2c = _mac(self._key, b"K s2c", cn, sn, self._server)
        self.session_keys = (c2s, s2c) if client else (s2c, c2s)
        self.done = True

    def feed(self, data: bytes) -> bytes:
        """Push received bytes; returns the bytes that follow the handshake
        (frames) once it is done.

        Raises:
            AuthenticationError: the peer's proof does not verify.
            ProtocolError: the peer does not speak this handshake.
        """
        self._buf += data
        self._step()
        if self.done:
            rest = bytes(self._buf)
            self._buf.clear()
            return rest
        return b""

    def _step(self) -> None:
        raise NotImplementedError


class ClientHandshake(_Handshake):
    """The connecting side.

    Args:
        key: the run key (:func:`run_key`).
        server: the identity of the worker this side means to reach.
    """

    def __init__(self, key: bytes, server: bytes) -> None:
        super().__init__(key, server)
        self._cn = secrets.token_bytes(_NONCE)
        self.outgoing += AUTH_MAGIC + bytes([VERSION]) + self._cn

    def _step(self) -> None:
        if self.done:
            return
        reply = self._take(_NONCE + _MAC)
        if reply is None:
            return
        sn, mac = reply[:_NONCE], reply[_NONCE:]
        if not hmac.compare_digest(mac, _mac(self._key, b"S", self._cn, sn, self._server)):
            raise AuthenticationError(
                "the server could not prove it holds the auth token (or it is not the "
                "worker of this run this side meant to reach)"
            )
        self.outgoing += _mac(self._key, b"C", sn, self._cn, self._server)
        self._derive(self._cn, sn, client=True)


class ServerHandshake(_Handshake):
    """The accepting side.

    Args:
        key: the run key (:func:`run_key`).
        server: this worker's identity.
    """

    def __init__(self, key: bytes, server: bytes) -> None:
        super().__init__(key, server)
        self._sn = secrets.token_bytes(_NONCE)
        self._cn: bytes | None = None

    def _step(self) -> None:
        if self._cn is None:
            hello = self._take(len(AUTH_MAGIC) + 1 + _NONCE)
            if hello is None:
                if len(self._buf) >= 4 and bytes(self._buf[:4]) != AUTH_MAGIC:
                    raise AuthenticationError("peer did not authenticate (no auth token?)")
                return
            if hello[:4] != AUTH_MAGIC:
                raise AuthenticationError("peer did not authenticate (no auth token?)")
            if hello[4] != VERSION:
                raise ProtocolError(f"unsupported handshake version {hello[4]}")
            self._cn = hello[5:]
            self.outgoing += self._sn + _mac(self._key, b"S", self._cn, self._sn, self._server)
        if self.done:
            return
        proof = self._take(_MAC)
        if proof is None:
            return
        if not hmac.compare_digest(proof, _mac(self._key, b"C", self._sn, self._cn, self._server)):
            raise AuthenticationError("the client could not prove it holds the auth token")
        self._derive(self._cn, self._sn, client=False)
