"""SOCKS5 (RFC 1928, with RFC 1929 user/password) on the gateway's side: the greeting, the
optional login, the CONNECT request, and the reply once the gateway has (or has not) reached
the target through a member. Only CONNECT: BIND and UDP ASSOCIATE get "command not
supported"."""

from __future__ import annotations

import asyncio
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
    """The client broke the protocol (or failed to log in): reply `code` if set, close."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class SocksRequest:
    host: str
    port: int
    username: str | None
    password: str | None


def reply(code: int) -> bytes:
    return struct.pack("!BBBB4sH", 5, code, 0, 1, b"\0\0\0\0", 0)


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    need_auth: bool,
    check: Callable[[str, str], bool],
) -> SocksRequest:
    """Read the greeting (its first byte, 5, already taken), the login (`check`ed) and the
    request.

    Without `need_auth` a client that offers user/password still gets to send it: the
    username carries the country and session choices."""
    (n,) = await reader.readexactly(1)
    methods = await reader.readexactly(n)
    if USER_PASS in methods:
        method = USER_PASS
    elif NO_AUTH in methods and not need_auth:
        method = NO_AUTH
    else:
        writer.write(bytes([5, NO_ACCEPTABLE]))
        raise SocksError("no acceptable authentication method")
    writer.write(bytes([5, method]))
    username = password = None
    if method == USER_PASS:
        version, ulen = await reader.readexactly(2)
        if version != 1:
            raise SocksError("bad login version")
        username = (await reader.readexactly(ulen)).decode("utf-8", "replace")
        (plen,) = await reader.readexactly(1)
        password = (await reader.readexactly(plen)).decode("utf-8", "replace")
        ok = check(username, password)
        writer.write(bytes([1, 0 if ok else 1]))
        if not ok:
            raise SocksError("login rejected")
    version, cmd, _rsv, atyp = await reader.readexactly(4)
    if version != 5:
        raise SocksError("bad request version", GENERAL_FAILURE)
    if atyp == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif atyp == 3:
        (hlen,) = await reader.readexactly(1)
        host = (await reader.readexactly(hlen)).decode("idna")
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    else:
        raise SocksError("bad address type", ADDRESS_NOT_SUPPORTED)
    (port,) = struct.unpack("!H", await reader.readexactly(2))
    if cmd != 1:
        raise SocksError("only CONNECT is supported", COMMAND_NOT_SUPPORTED)
    return SocksRequest(host, port, username, password)
