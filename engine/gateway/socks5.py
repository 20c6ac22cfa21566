"""SOCKS5 (RFC 1928, with RFC 1929 user/password) on the gateway's side: the greeting, the
optional login, the CONNECT request, and the reply once the gateway has (or has not) reached
the target through a member. Only CONNECT: BIND and UDP ASSOCIATE get "command not
supported"."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

NO_AUTH, USER_PASS, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
# reply codes
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_NOT_SUPPORTED = 0x08


class SocksError(Exception):
    """The client broke the protocol (or failed to log in): `reply` is sent, then a close."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(slots=True)
class SocksRequest:
    host: str
    port: int
    username: str | None
    password: str | None


def reply(code: int) -> bytes:
    return struct.pack("!BBBB4sH", 5, code, 0, 1, b"\0\0\0\0", 0)


class Handshake:
    """The server side over the buffered bytes: `step(buf)` consumes what it can, sends the
    replies due through `send`, and returns the request once it is complete.

    Without `need_auth` a client that offers user/password still gets to send it: the
    username carries the country and session choices."""

    __slots__ = ("check", "need_auth", "password", "send", "stage", "username")

    def __init__(
        self, send: Callable[[bytes], None], *, need_auth: bool, check: Callable[[str, str], bool]
    ) -> None:
        self.send, self.need_auth, self.check = send, need_auth, check
        self.stage = 0
        self.username: str | None = None
        self.password: str | None = None

    def step(self, buf: bytearray) -> SocksRequest | None:
        while True:
            if self.stage == 0:  # greeting: 5, n, n methods
                if len(buf) < 2 or len(buf) < 2 + buf[1]:
                    return None
                methods = bytes(buf[2 : 2 + buf[1]])
                del buf[: 2 + buf[1]]
                if USER_PASS in methods:
                    self.stage = 1
                    self.send(bytes([5, USER_PASS]))
                elif NO_AUTH in methods and not self.need_auth:
                    self.stage = 2
                    self.send(bytes([5, NO_AUTH]))
                else:
                    raise SocksError(
                        "no acceptable authentication method", bytes([5, NO_ACCEPTABLE])
                    )
            elif self.stage == 1:  # RFC 1929 login: 1, ulen, user, plen, password
                if len(buf) < 2 or len(buf) < 3 + buf[1] or len(buf) < 3 + buf[1] + buf[2 + buf[1]]:
                    return None
                if buf[0] != 1:
                    raise SocksError("bad login version")
                ulen = buf[1]
                plen = buf[2 + ulen]
                self.username = bytes(buf[2 : 2 + ulen]).decode("utf-8", "replace")
                self.password = bytes(buf[3 + ulen : 3 + ulen + plen]).decode("utf-8", "replace")
                del buf[: 3 + ulen + plen]
                if not self.check(self.username, self.password):
                    raise SocksError("login rejected", bytes([1, 1]))
                self.send(bytes([1, 0]))
                self.stage = 2
            else:  # request: 5, cmd, 0, atyp, address, port
                if len(buf) < 5:
                    return None
                version, cmd, _rsv, atyp = buf[:4]
                if version != 5:
                    raise SocksError("bad request version", reply(GENERAL_FAILURE))
                if atyp == 1:
                    start, size = 4, 4
                elif atyp == 3:
                    start, size = 5, buf[4]
                elif atyp == 4:
                    start, size = 4, 16
                else:
                    raise SocksError("bad address type", reply(ADDRESS_NOT_SUPPORTED))
                end = start + size + 2
                if len(buf) < end:
                    return None
                raw = bytes(buf[start : start + size])
                (port,) = struct.unpack("!H", buf[end - 2 : end])
                del buf[:end]
                if cmd != 1:
                    raise SocksError("only CONNECT is supported", reply(COMMAND_NOT_SUPPORTED))
                host = raw.decode("idna") if atyp == 3 else str(ipaddress.ip_address(raw))
                return SocksRequest(host, port, self.username, self.password)
