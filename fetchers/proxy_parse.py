"""Proxy lists in, `ProxySpec`s out: every format people actually paste, streamed.

Accepted line forms (schemes case-insensitive; `socks5h` and `socks` → socks5, `socks4a` →
socks4)::

    1.2.3.4:8080                      host:port (no scheme: the checker detects it)
    socks5://1.2.3.4:1080             scheme://host:port
    http://user:pass@proxy.example:3128
    user:pass@1.2.3.4:8080
    1.2.3.4:8080:user:pass            the "provider export" form (password may contain ':')
    [2001:db8::1]:8080                IPv6 literals in brackets, with or without a scheme
    1.2.3.4:8080   # office           a trailing " # comment" is dropped

CSV files are recognised from their first row: a header naming a `proxy` / `address` / `url`
column, or `ip`/`host` + `port` columns (plus optional `protocol`/`type`, `username`,
`password`), or comma/semicolon/tab separated rows where a field parses as a proxy or an
IP is followed by a port. Blank lines and comments (`#`, `//`) are skipped.

Files are read lazily, line by line with a bounded line length, so a 100 MB list costs the
memory of its distinct keys (for deduplication), not of its text. The encoding is sniffed
from the first 8 KB: UTF-8 (with or without BOM), UTF-16 with BOM, else latin-1; NUL bytes
or mostly control characters mean a binary file and a `ProxyParseError` for the whole file.

IPv4 octets written with leading zeros (`010.001.002.003`, common in scraped lists) are read
as decimal, not octal as `inet_aton` would.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import ipaddress
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from fetchers.errors import ProxyParseError

__all__ = [
    "MAX_LINE_CHARS",
    "SCHEMES",
    "LoadReport",
    "ParsedLine",
    "ProxySpec",
    "iter_proxy_lines",
    "iter_unique_proxies",
    "load_proxy_list",
    "parse_proxy_line",
]

#: Longest line (in characters) still considered; longer lines are reported as errors.
MAX_LINE_CHARS = 2000
#: The schemes a `ProxySpec` can carry.
SCHEMES = ("http", "https", "socks4", "socks5")

_SCHEME_ALIASES = {
    "http": "http",
    "https": "https",
    "socks4": "socks4",
    "socks4a": "socks4",
    "socks5": "socks5",
    "socks5h": "socks5",
    "socks": "socks5",
}
_SNIFF_BYTES = 8192
_EXAMPLE = "expected host:port, e.g. 10.0.0.1:8080"

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# The overwhelmingly common lines, `[scheme://]a.b.c.d:port` in canonical form, skip the
# general parser (3× faster on big lists).
_FAST_LINE = re.compile(
    rf"(?:(https?|socks4a?|socks5h?)://)?({_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}):([1-9]\d{{0,4}})",
    re.IGNORECASE,
)
_IPV4ISH = re.compile(r"[0-9.]+")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*",
)
_PATH_SPLIT = re.compile(r"[/?#]")
_FIELD_SEP = re.compile(r"[\s,;]+")


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True, slots=True, repr=False)
class ProxySpec:
    """One proxy as written in a list: where it is, how to talk to it, and its credentials.

    `scheme` is None when the line did not say (the checker then detects the protocol).
    `host` is a canonical IPv4/IPv6 literal (no brackets) or a lower-case hostname.
    Construct through `parse_proxy_line` for validation; direct construction checks the
    scheme and port and normalises the host's case and brackets.
    """

    scheme: str | None
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.scheme is not None and self.scheme not in SCHEMES:
            raise ProxyParseError(
                f"scheme '{self.scheme}' is not supported (use {', '.join(SCHEMES)})",
                field="scheme",
            )
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ProxyParseError(f"port {self.port} out of range 1-65535", field="port")
        host = self.host
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ProxyParseError(f"host is empty ({_EXAMPLE})", field="host")
        if ":" not in host:
            host = host.lower()
        if host != self.host:
            object.__setattr__(self, "host", host)

    # -- identity and display

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def netloc_host(self) -> str:
        """The host as it appears in a URL or an authority (`[v6]` bracketed)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def key(self) -> str:
        """Stable identity for deduplication and storage: never contains the password."""
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        return f"{self.scheme or 'auto'}://{user}{self.netloc_host}:{self.port}"

    def url(self, scheme: str | None = None) -> str:
        """The full URL with credentials, for connecting. `scheme` overrides the spec's own.

        Raises ValueError when neither the spec nor the argument gives a scheme.
        """
        scheme = scheme or self.scheme
        if scheme is None:
            raise ValueError(f"{self.redacted()} has no scheme: pass url(scheme=...)")
        return f"{scheme}://{self._userinfo(self.password)}{self.netloc_host}:{self.port}"

    def redacted(self) -> str:
        """URL for logs and the UI: the password replaced by `***`.

        A spec without a scheme renders as `host:port` (with `user:***@` if any).
        """
        pw = None if self.password is None else "***"
        prefix = f"{self.scheme}://" if self.scheme else ""
        return f"{prefix}{self._userinfo(pw, raw_password=True)}{self.netloc_host}:{self.port}"

    def _userinfo(self, password: str | None, *, raw_password: bool = False) -> str:
        if self.username is None:
            return ""
        user = quote(self.username, safe="")
        if password is None:
            return f"{user}@"
        pw = password if raw_password else quote(password, safe="")
        return f"{user}:{pw}@"

    def __repr__(self) -> str:
        pw = "None" if self.password is None else "'***'"
        return (
            f"ProxySpec(scheme={self.scheme!r}, host={self.host!r}, port={self.port}, "
            f"username={self.username!r}, password={pw})"
        )

    __str__ = redacted


# --------------------------------------------------------------------------- one line


def _bad(message: str, fld: str) -> ProxyParseError:
    return ProxyParseError(message, field=fld)


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _shown(value: str, show: bool, n: int = 60) -> str:
    """` 'value'` for a message, or nothing when the value may be a credential."""
    return f" '{_clip(value, n)}'" if show else ""


def _parse_port(text: str, show: bool = True) -> int:
    p = text.strip()
    if not p:
        raise _bad(f"port is missing ({_EXAMPLE})", "port")
    if not (p.isascii() and p.isdigit()):
        raise _bad(f"port{_shown(p, show, 20)} is not a number ({_EXAMPLE})", "port")
    n = int(p)
    if not 1 <= n <= 65535:
        raise _bad(
            f"port {n} out of range 1-65535" if show else "port out of range 1-65535", "port"
        )
    return n


def _parse_host(h: str, *, bracketed: bool = False, show: bool = True) -> str:
    if not h:
        raise _bad(f"host is empty ({_EXAMPLE})", "host")
    if bracketed or ":" in h:
        try:
            return ipaddress.IPv6Address(h).compressed
        except ValueError:
            shown = f" '[{_clip(h)}]'" if show else ""
            raise _bad(f"host{shown} is not a valid IPv6 address", "host") from None
    if _IPV4ISH.fullmatch(h):
        parts = h.split(".")
        if len(parts) != 4 or any(not p or len(p) > 3 or int(p) > 255 for p in parts):
            raise _bad(
                f"host{_shown(h, show)} is not a valid IPv4 address "
                "(four numbers 0-255, e.g. 10.0.0.1)",
                "host",
            )
        return ".".join(str(int(p)) for p in parts)
    name = h.lower().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _bad(f"host{_shown(h, show)} is not a valid hostname", "host") from None
    if not _HOSTNAME.fullmatch(name):
        raise _bad(f"host{_shown(h, show)} is not a valid hostname or IP address", "host")
    return name


def _looks_like_bare_ipv6(hostport: str) -> bool:
    for candidate in (hostport, hostport.rpartition(":")[0]):
        try:
            ipaddress.IPv6Address(candidate)
            return True
        except ValueError:
            pass
    return False


def _may_hold_credentials(line: str) -> bool:
    """Whether a line has room for a user or password: an `@`, a field separator (blank,
    `,`, `;`), or more than `host:port` outside an IPv6 literal's brackets. Such a line's
    values are never quoted in an error: a misplaced or misordered password would be."""
    m = _SCHEME_RE.match(line)
    s = line[m.end() :] if m else line
    if "@" in s or _FIELD_SEP.search(s):
        return True
    if s.count(":") < 2:  # host:port at most (the common line): no IPv6 parse needed
        return False
    if s.startswith("["):
        s = s[s.find("]") + 1 :] if "]" in s else ""
    elif _looks_like_bare_ipv6(s):
        return False
    return s.count(":") > 1


def parse_proxy_line(text: str) -> ProxySpec:
    """Parse one proxy line (any accepted form, see the module doc) into a `ProxySpec`.

    Raises `ProxyParseError` naming the wrong field (`scheme`, `host`, `port`,
    `credentials`, `line`). Its message quotes the faulty value only when the line cannot
    hold credentials (no `@`, nothing past `host:port`): it is printed, stored and exported.
    """
    return _parse_line(text, show=True)


def _parse_line(text: str, *, show: bool) -> ProxySpec:
    """`parse_proxy_line`; `show=False` never quotes a value (a CSV cell of unknown role)."""
    s = text.strip()
    m = _FAST_LINE.fullmatch(s)
    if m is not None:
        raw_scheme, host, port_text = m.groups()
        port = int(port_text)
        if port <= 65535:
            scheme = _SCHEME_ALIASES[raw_scheme.lower()] if raw_scheme else None
            return ProxySpec(scheme, host, port)
    if not s:
        raise _bad("line is empty", "line")
    if len(s) > MAX_LINE_CHARS:
        raise _bad(
            f"line is {len(s):,} characters long (limit {MAX_LINE_CHARS:,}): not a proxy",
            "line",
        )

    scheme: str | None = None
    m = _SCHEME_RE.match(s)
    show = show and not _may_hold_credentials(s)
    if m is not None:
        raw = m.group(1).lower()
        scheme = _SCHEME_ALIASES.get(raw)
        if scheme is None:
            raise _bad(
                f"scheme{_shown(raw, show, 20)} is not supported "
                "(use http, https, socks4 or socks5)",
                "scheme",
            )
        s = s[m.end() :]
    elif "://" in s and not re.search(r"[:@\s]", s.partition("://")[0]):
        # (a "://" after a ':' or '@' is inside a password: `host:port:user:pa://ss`)
        raise _bad(
            f"scheme{_shown(s.partition('://')[0], show, 20)} is not valid "
            "(use http, https, socks4 or socks5)",
            "scheme",
        )

    userinfo, at, hostpart = s.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, pw = userinfo.partition(":")
        if not user:
            raise _bad("username is empty (expected user:pass@host:port)", "credentials")
        username = unquote(user)
        password = unquote(pw) if colon else None

    if hostpart.startswith("["):
        end = hostpart.find("]")
        if end == -1:
            raise _bad("IPv6 address has no closing ']' (e.g. [2001:db8::1]:8080)", "host")
        host = _parse_host(hostpart[1:end], bracketed=True, show=show)
        rest = hostpart[end + 1 :]
        if not rest.startswith(":"):
            raise _bad(f"port is missing after ']' ({_EXAMPLE})", "port")
        port_text, colon, creds = rest[1:].partition(":")
        if colon:  # [v6]:port:user:pass
            if at:
                raise _bad("credentials given twice (user@ and :user:pass)", "credentials")
            username, _, password = creds.partition(":")
            if not username:
                raise _bad("username is empty (expected host:port:user:pass)", "credentials")
        port = _parse_port(_PATH_SPLIT.split(port_text, maxsplit=1)[0], show)
        return ProxySpec(scheme, host, port, username, password)

    parts = hostpart.split(":")
    if len(parts) == 2:
        host_text, port_text = parts
        port_text = _PATH_SPLIT.split(port_text, maxsplit=1)[0]
    elif len(parts) == 1:
        host_text = _PATH_SPLIT.split(parts[0], maxsplit=1)[0]
        if not host_text:
            raise _bad(f"host is empty ({_EXAMPLE})", "host")
        raise _bad(f"port is missing ({_EXAMPLE})", "port")
    elif _looks_like_bare_ipv6(hostpart):
        raise _bad("IPv6 address must be in brackets, e.g. [2001:db8::1]:8080", "host")
    elif len(parts) >= 4 and not at:
        host_text, port_text, username = parts[0], parts[1], parts[2]
        password = ":".join(parts[3:])
        if not username:
            raise _bad("username is empty (expected host:port:user:pass)", "credentials")
    else:
        raise _bad(
            f"expected host:port or host:port:user:pass, got {len(parts)} ':'-separated parts",
            "line",
        )
    host = _parse_host(host_text, show=show)
    port = _parse_port(port_text, show)
    return ProxySpec(scheme, host, port, username, password)


# --------------------------------------------------------------------------- CSV


def _norm_col(name: str) -> str:
    return re.sub(r"[\s\-.]+", "_", name.strip().strip('"').lower())


_PROXY_COLS = {"proxy", "proxies", "address", "addr", "proxy_address", "url", "proxy_url"}
_HOST_COLS = {"ip", "host", "hostname", "ip_address", "ipaddress", "ip_addr", "server"}
_PORT_COLS = {"port", "proxy_port"}
_SCHEME_COLS = {"protocol", "protocols", "scheme", "type", "proxy_type", "kind"}
_USER_COLS = {"username", "user", "login", "user_name"}
_PASS_COLS = {"password", "pass", "passwd", "pwd"}
_ALL_COLS = _PROXY_COLS | _HOST_COLS | _PORT_COLS | _SCHEME_COLS | _USER_COLS | _PASS_COLS


def _first(names: list[str], wanted: set[str]) -> int | None:
    for i, n in enumerate(names):
        if n in wanted:
            return i
    return None


def _scheme_from_cell(value: str) -> str | None:
    for token in re.split(r"[\s,;/|]+", value.lower()):
        s = _SCHEME_ALIASES.get(token.removesuffix("://"))
        if s is not None:
            return s
    return None


@dataclass(slots=True)
class _CsvLayout:
    proxy: int | None = None
    host: int | None = None
    port: int | None = None
    scheme: int | None = None
    user: int | None = None
    password: int | None = None


def _cell(fields: list[str], i: int | None) -> str:
    return fields[i].strip() if i is not None and i < len(fields) else ""


def _host_port_text(host: str, port: str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class _LineParser:
    """Parses the content lines of one source; remembers whether it is a CSV and its layout."""

    def __init__(self) -> None:
        self.mode: str | None = None  # "plain" or "csv", decided by the first content line
        self.delimiter = ","
        self.layout: _CsvLayout | None = None

    def feed(self, text: str) -> ProxySpec | None:
        """Parse a content line. Returns None for a CSV header row; raises ProxyParseError."""
        if self.mode is None:
            delim = next((d for d in (",", ";", "\t") if d in text), None)
            if delim is None:
                self.mode = "plain"
            else:
                self.mode = "csv"
                self.delimiter = delim
                fields = self._split(text)
                if self._maybe_header(fields):
                    return None
        if self.mode == "plain":
            return self._plain(text)
        return self._row(self._split(text))

    def _split(self, text: str) -> list[str]:
        try:
            return next(csv.reader([text], delimiter=self.delimiter))
        except (csv.Error, StopIteration):
            return text.split(self.delimiter)

    def _maybe_header(self, fields: list[str]) -> bool:
        names = [_norm_col(f) for f in fields]
        if not any(n in _ALL_COLS for n in names):
            return False
        for f in fields:  # a data row whose cell happens to be called "host"? Not a header.
            try:
                parse_proxy_line(f)
                return False
            except ProxyParseError:
                pass
        layout = _CsvLayout(
            proxy=_first(names, _PROXY_COLS),
            host=_first(names, _HOST_COLS),
            port=_first(names, _PORT_COLS),
            scheme=_first(names, _SCHEME_COLS),
            user=_first(names, _USER_COLS),
            password=_first(names, _PASS_COLS),
        )
        if layout.proxy is None and layout.host is not None and layout.port is None:
            layout.proxy, layout.host = layout.host, None  # an "ip" column holding ip:port
        if layout.proxy is None and layout.host is None:
            return False
        self.layout = layout
        return True

    def _plain(self, text: str) -> ProxySpec:
        show = not _may_hold_credentials(text)  # judged on the line before it is cut
        hash_at = text.find(" #")
        if hash_at == -1:
            hash_at = text.find("\t#")
        if hash_at != -1:
            text = text[:hash_at].rstrip()
        try:
            return _parse_line(text, show=show)
        except ProxyParseError:
            # "1.2.3.4:8080 US elite" — a proxy followed by words; or a stray CSV row.
            first = text.split(None, 1)[0]
            if first != text:
                try:
                    return _parse_line(first, show=False)
                except ProxyParseError:
                    pass
            if any(d in text for d in (",", ";", "\t")):
                try:
                    return self._guess_row(re.split(r"[,;\t]", text))
                except ProxyParseError:
                    pass
            raise

    def _row(self, fields: list[str]) -> ProxySpec:
        lay = self.layout
        if lay is None:
            return self._guess_row(fields)
        if lay.proxy is not None:
            value = _cell(fields, lay.proxy)
            if not value and lay.host is not None:
                value = _host_port_text(_cell(fields, lay.host), _cell(fields, lay.port))
        else:
            host = _cell(fields, lay.host)
            port = _cell(fields, lay.port)
            if not port and ":" in host and not host.startswith("["):
                value = host
            else:
                value = _host_port_text(host, port)
        if not value:
            raise _bad("proxy column is empty in this CSV row", "host")
        spec = parse_proxy_line(value)
        return self._complete(spec, fields)

    def _complete(self, spec: ProxySpec, fields: list[str]) -> ProxySpec:
        lay = self.layout
        if lay is None:
            return spec
        changes: dict[str, str] = {}
        if spec.scheme is None and lay.scheme is not None:
            scheme = _scheme_from_cell(_cell(fields, lay.scheme))
            if scheme:
                changes["scheme"] = scheme
        if spec.username is None and lay.user is not None:
            user = _cell(fields, lay.user)
            if user:
                changes["username"] = user
                pw = _cell(fields, lay.password)
                if lay.password is not None:
                    changes["password"] = pw
        return dataclasses.replace(spec, **changes) if changes else spec

    def _guess_row(self, fields: list[str]) -> ProxySpec:
        cells = [f.strip() for f in fields]
        scheme = next((s for c in cells if (s := _SCHEME_ALIASES.get(c.lower()))), None)
        first_error: ProxyParseError | None = None
        for c in cells:
            if ":" in c:
                try:
                    spec = _parse_line(c, show=False)
                except ProxyParseError as e:
                    first_error = first_error or e
                    continue
                if spec.scheme is None and scheme:
                    spec = dataclasses.replace(spec, scheme=scheme)
                return spec
        for a, b in itertools.pairwise(cells):
            if b.isascii() and b.isdigit():
                try:
                    host = _parse_host(a.strip("[]"), bracketed=":" in a, show=False)
                except ProxyParseError:
                    continue
                return ProxySpec(scheme, host, _parse_port(b, show=False))
        if first_error is not None:
            raise first_error
        raise _bad(
            "no proxy found in this CSV row (expected a column like ip:port, "
            "or an ip column followed by a port column)",
            "line",
        )


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """One content line of a proxy list (blank lines, comments and CSV headers are not).

    `text` is the line as given (clipped to MAX_LINE_CHARS); it may contain credentials and
    is therefore left out of repr — show `error` and `line_no` instead.
    """

    line_no: int
    text: str = field(repr=False)
    spec: ProxySpec | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.spec is not None


def _sniff_encoding(sample: bytes, name: str) -> str:
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    hint = "export it as plain text with one proxy per line"
    if b"\x00" in sample:
        raise ProxyParseError(
            f"{name} looks like a binary file, not a proxy list (NUL bytes in its first "
            f"8 KB); {hint}",
            field="file",
        )
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    controls = sum(1 for b in sample if (b < 0x20 and b not in b"\t\n\r\f\v") or b == 0x7F)
    if controls > len(sample) // 20:
        raise ProxyParseError(
            f"{name} looks like a binary file, not a proxy list (not text in any encoding "
            f"we know); {hint}",
            field="file",
        )
    return "latin-1"


def _iter_file_lines(path: Path) -> Iterator[str]:
    """Lines of a file without their newline, read lazily; a line longer than the limit
    is yielded clipped to MAX_LINE_CHARS + 1 characters (so it is reported, not stored)."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise ProxyParseError(
            f"cannot read proxy list {path}: {e.strerror or e}", field="file"
        ) from e
    with f:
        encoding = _sniff_encoding(f.read(_SNIFF_BYTES), str(path))
        f.seek(0)
        text = io.TextIOWrapper(f, encoding=encoding, errors="replace", newline=None)
        limit = MAX_LINE_CHARS + 1
        while True:
            line = text.readline(limit)
            if not line:
                return
            if line.endswith("\n"):
                yield line[:-1]
                continue
            if len(line) < limit:  # last line without newline
                yield line
                return
            while True:  # skip the rest of an over-long line
                rest = text.readline(65536)
                if not rest or rest.endswith("\n"):
                    break
            yield line


def _iter_text_lines(items: Iterable[str]) -> Iterator[str]:
    seen = 0
    for item in items:
        if seen < _SNIFF_BYTES:
            if "\x00" in item:
                raise ProxyParseError(
                    "input looks like a binary file, not a proxy list (NUL characters); "
                    "export it as plain text with one proxy per line",
                    field="file",
                )
            seen += len(item)
        if "\n" in item or "\r" in item:
            yield from item.splitlines()
        else:
            yield item


def _raw_lines(source: Path | str | Iterable[str]) -> Iterator[str]:
    if isinstance(source, str | Path):
        return _iter_file_lines(Path(source))
    if isinstance(source, bytes | bytearray):
        raise TypeError("pass a path or an iterable of str lines, not bytes")
    return _iter_text_lines(source)


def iter_proxy_lines(source: Path | str | Iterable[str]) -> Iterator[ParsedLine]:
    """Parse a proxy list lazily, yielding one `ParsedLine` per content line.

    `source` is a path (`str` or `Path`) or an iterable of text lines (an open text file,
    `text.splitlines()`, a list). Raises `ProxyParseError` (field "file") up front when the
    file cannot be opened or looks binary; per-line problems are in `ParsedLine.error`.
    """
    parser = _LineParser()
    line_no = 0
    for raw in _raw_lines(source):
        line_no += 1
        text = raw.strip()
        if not text or text.startswith(("#", "//")):
            continue
        if len(text) > MAX_LINE_CHARS:
            yield ParsedLine(
                line_no,
                text[:MAX_LINE_CHARS],
                None,
                f"line is longer than {MAX_LINE_CHARS:,} characters: not a proxy",
            )
            continue
        try:
            spec = parser.feed(text)
        except ProxyParseError as e:
            yield ParsedLine(line_no, text, None, str(e))
            continue
        if spec is None:  # CSV header row
            continue
        yield ParsedLine(line_no, text, spec, None)


# --------------------------------------------------------------------------- whole lists


@dataclass(slots=True)
class LoadReport:
    """What loading a proxy list found. `proxies` is empty for the streaming variant."""

    proxies: list[ProxySpec] = field(default_factory=list)
    lines: int = 0  # content lines (not blank, comment or CSV header)
    duplicates: int = 0
    errors: list[ParsedLine] = field(default_factory=list)  # the first max_errors_kept
    error_count: int = 0
    unique: int = 0

    def summary(self, max_errors_shown: int = 3) -> str:
        def n(count: int, word: str) -> str:
            return f"{count:,} {word}{'' if count == 1 else 's'}"

        noun = "proxy" if self.unique == 1 else "proxies"
        text = f"loaded {self.unique:,} {noun} from {n(self.lines, 'line')}"
        details = []
        if self.duplicates:
            details.append(f"{n(self.duplicates, 'duplicate')} merged")
        if self.error_count:
            first = self.errors[:max_errors_shown]
            shown = "; ".join(f"line {e.line_no}: {e.error}" for e in first)
            more = "; …" if self.error_count > len(first) else ""
            details.append(f"{self.error_count:,} malformed: {shown}{more}")
        if details:
            text += f" ({', '.join(details)})"
        return text


def iter_unique_proxies(
    source: Path | str | Iterable[str],
    report: LoadReport | None = None,
    max_errors_kept: int = 1000,
) -> Iterator[ProxySpec]:
    """Yield each distinct proxy (by `ProxySpec.key`) once, in first-seen order, lazily.

    For huge files: memory is the set of keys, not the list. When `report` is given its
    counters and `errors` are updated as the iteration goes (its `proxies` stays empty).
    """
    rep = report if report is not None else LoadReport()
    seen: set[str] = set()
    for pl in iter_proxy_lines(source):
        rep.lines += 1
        spec = pl.spec
        if spec is None:
            rep.error_count += 1
            if len(rep.errors) < max_errors_kept:
                rep.errors.append(pl)
            continue
        key = spec.key
        if key in seen:
            rep.duplicates += 1
            continue
        seen.add(key)
        rep.unique += 1
        yield spec


def load_proxy_list(source: Path | str | Iterable[str], max_errors_kept: int = 1000) -> LoadReport:
    """Parse a whole proxy list, merge duplicates (same key) and report what was found."""
    report = LoadReport()
    report.proxies.extend(iter_unique_proxies(source, report, max_errors_kept))
    return report


_PORTISH = re.compile(r"\s*\d{1,5}(?:[/?#].*)?\s*")


def _secret_spans(rest: str) -> list[tuple[int, int]]:
    """Where a password may sit in one field (its scheme removed), under every reading.

    A malformed line has no single meaning, so each plausible form masks its password
    part and the union is hidden: `user:pass@host` (up to the *last* `@`: passwords hold
    `@`), `host:port:user:pass` (after the third `:`) and the misordered
    `user:pass:host:port` (up to the `:` before the host). A field none of them explains
    keeps only what precedes its first `:`.
    """
    if "@" not in rest and "[" not in rest and _looks_like_bare_ipv6(rest):
        return []
    # an IPv6 literal is one host token (same length, so positions stay valid)
    view = re.sub(r"\[[0-9A-Fa-f:.]*\]", lambda m: "h" * len(m.group()), rest)
    colons = [i for i, c in enumerate(view) if c == ":"]
    if not colons:
        return []
    parts = view.split(":")
    portish = [bool(_PORTISH.fullmatch(p)) for p in parts]
    spans: list[tuple[int, int]] = []
    at = rest.rfind("@")
    userinfo_form = False
    if at != -1:
        after = view[at + 1 :]
        userinfo_form = after.count(":") == 0 or (
            after.count(":") == 1 and bool(_PORTISH.fullmatch(after.rpartition(":")[2]))
        )
        if colons[0] < at:
            spans.append((colons[0] + 1, at))
    if len(parts) >= 4:
        misordered = portish[-1] and not portish[1]
        if not misordered:  # host:port:user:pass, even with a bad port
            spans.append((colons[2] + 1, len(rest)))
        if portish[-1] or not portish[1]:  # user:pass:host:port
            spans.append((colons[0] + 1, colons[-2]))
    elif not userinfo_form and not portish[1]:
        spans.append((colons[0] + 1, len(rest)))  # nothing explains it: keep the first part
    return spans


def _redact_field(text: str) -> str:
    m = _SCHEME_RE.match(text)
    start = m.end() if m else 0
    spans = sorted((start + a, start + b) for a, b in _secret_spans(text[start:]) if b > a)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1] + 1:  # overlapping or one separator apart
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, pos = [], 0
    for a, b in merged:
        out.append(text[pos:a] + "***")
        pos = b
    return "".join(out) + text[pos:]


def redact_line(text: str, limit: int = 120) -> str:
    """A line as it may be shown or stored: passwords masked, even when the line is malformed.

    The first field (up to a blank, `,` or `;`) is masked under every reading that could put
    a password in it (see `_secret_spans`); the user name stays (it is part of a proxy's
    key). Of the other fields only a port right after an IP address is kept (`ip;port;…`):
    any of them may be a password column or a password with a blank in it. A line of
    word or two (no `:`, `@`, `,`, `;`, tab, number or IP address) is kept. Clipped to
    ``limit`` characters.
    """
    text = text.strip()
    words = text.split()
    if (
        len(words) <= 2
        and not re.search(r"[:@,;\t]", text)
        and not any(w.isdigit() or _is_ip(w) for w in words)
    ):
        return _clip(text, limit)  # a word or two ("garbage line"): no room for a password
    fields = _FIELD_SEP.split(text)
    seps = _FIELD_SEP.findall(text)
    shown = _redact_field(fields[0])
    rest = 1
    if len(fields) > 1 and _PORTISH.fullmatch(fields[1]) and _is_ip(fields[0]):
        shown += seps[0] + fields[1]
        rest = 2
    if len(fields) > rest:
        shown += seps[rest - 1] + "***"
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True
