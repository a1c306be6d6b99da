"""Mutual challenge-response authentication over a shared secret (sans-I/O).

Theory of operation
-------------------
When the group has an ``auth_token``, each connection starts with this
exchange, before any frame is read (so nothing from an unauthenticated peer
is ever decoded)::

    client -> server   b"ARPA" version u8, client nonce (32 bytes)
    server -> client   server nonce (32), HMAC(token, b"S" + cn + sn)
    client -> server   HMAC(token, b"C" + sn + cn)

Each side checks the other's MAC with a constant-time compare; a mismatch
raises :class:`AuthenticationError` and the connection is closed. Nonces come
from ``secrets``, so replaying a recorded exchange does not verify.

:func:`token_proof` lets workers check each other's tokens at rendezvous time
(a MAC of the group id and rank, never the token itself), so ``init_rpc``
with a wrong token fails at once instead of at the first call.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from .errors import AuthenticationError, ProtocolError

__all__ = ["AUTH_MAGIC", "ClientHandshake", "ServerHandshake", "token_proof"]

AUTH_MAGIC = b"ARPA"
_VERSION = 1
_NONCE = 32
_MAC = 32


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"".join(parts), hashlib.sha256).digest()


def token_proof(token: str, group: str, rank: int) -> bytes:
    """A proof that the worker ``rank`` of ``group`` holds ``token``."""
    return _mac(token.encode(), b"R", group.encode(), str(rank).encode())


class _Handshake:
    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._buf = bytearray()
        self.done = False
        self.outgoing = bytearray()  # bytes to send; the caller drains it

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

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
    """The connecting side."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
        self._cn = secrets.token_bytes(_NONCE)
        self.outgoing += AUTH_MAGIC + bytes([_VERSION]) + self._cn

    def _step(self) -> None:
        if self.done:
            return
        reply = self._take(_NONCE + _MAC)
        if reply is None:
            return
        sn, mac = reply[:_NONCE], reply[_NONCE:]
        if not hmac.compare_digest(mac, _mac(self._token, b"S", self._cn, sn)):
            raise AuthenticationError("the server could not prove it holds the auth token")
        self.outgoing += _mac(self._token, b"C", sn, self._cn)
        self.done = True


class ServerHandshake(_Handshake):
    """The accepting side."""

    def __init__(self, token: str) -> None:
        super().__init__(token)
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
            if hello[4] != _VERSION:
                raise ProtocolError(f"unsupported handshake version {hello[4]}")
            self._cn = hello[5:]
            self.outgoing += self._sn + _mac(self._token, b"S", self._cn, self._sn)
        if self.done:
            return
        proof = self._take(_MAC)
        if proof is None:
            return
        if not hmac.compare_digest(proof, _mac(self._token, b"C", self._sn, self._cn)):
            raise AuthenticationError("the client could not prove it holds the auth token")
        self.done = True
