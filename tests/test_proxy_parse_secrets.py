"""No credential reaches a parse error or a redacted line, whatever the line's form.

Parse errors are printed, shown in the console, stored in `errors` and exported, and
`redact_line` is what is stored of a malformed line: neither may hold any part of a password
(nor, for errors, the user name). The table crosses every accepted list form (and the usual
misordered `user:pass:host:port`) with good and bad hosts and ports and passwords holding the
characters that break naive splitting. Each password is made of distinctive fragments, so a
partial leak (`p@ss` showing `ss`) is caught too.
"""

from __future__ import annotations

import itertools

import pytest

from fetchers.errors import ProxyParseError
from fetchers.proxy_parse import iter_proxy_lines, parse_proxy_line, redact_line

USER = "Uq7name"
PASSWORDS = [
    "Kx1pw",
    "Kx1@Kx2",
    "Kx1:Kx2",
    "Kx1:Kx2:Kx3",
    "Kx1/Kx2",
    "Kx1#Kx2",
    "Kx1 #Kx2",
    "Kx1@Kx2:Kx3/Kx4#Kx5",
    "Kx1://Kx2",
    "@Kx1",
    ":Kx1",
    "Kx1@",
    "Kx1:",
    "Kx1ü€Kx2",
    "Kx1 Kx2",
    "987651",
    "Kx1;Kx2",
    "Kx1,Kx2",
    "[Kx1]",
]
HOSTS = ["1.2.3.4", "proxy.example", "999.1.1.1", "bad_host!", "", "[2001:db8::1]", "[zz::1]"]
PORTS = ["8080", "0", "99999", "http", ""]
SCHEMES = ["", "http://", "socks5://", "ftp://"]

FORMS = {
    "host:port:user:pass": "{s}{h}:{p}:{u}:{pw}",
    "user:pass@host:port": "{s}{u}:{pw}@{h}:{p}",
    "user:pass@host": "{s}{u}:{pw}@{h}",
    "user:pass:host:port": "{s}{u}:{pw}:{h}:{p}",
    "host:port:user:pass # note": "{s}{h}:{p}:{u}:{pw} # note",
    "host:port user:pass": "{s}{h}:{p} {u}:{pw}",
    "csv host;port;user;pass": "{h};{p};{u};{pw}",
    "csv host,port,http,user,pass": "{h},{p},http,{u},{pw}",
    "csv user;pass;host:port": "{u};{pw};{h}:{p}",
    "tsv host port user pass": "{h}\t{p}\t{u}\t{pw}",
    "words host port user pass": "{h} {p} {u} {pw}",
}


def fragments(password: str) -> list[str]:
    """The distinctive pieces of a password: each must stay hidden on its own."""
    found = [password[i : i + 3] for i in range(len(password)) if password[i : i + 2] == "Kx"]
    return found or [password]


def leaks(text: str | None, password: str, *, user: bool) -> list[str]:
    if not text:
        return []
    out = [f for f in fragments(password) if f in text]
    if user and USER in text:
        out.append(USER)
    return out


def lines_for(form: str) -> list[tuple[str, str]]:
    cases = []
    for s, h, p, pw in itertools.product(SCHEMES, HOSTS, PORTS, PASSWORDS):
        if "{s}" not in form and s:
            continue
        if " {p} " in form and not h and not p:
            continue  # "user pass": two words, indistinguishable from any other text
        cases.append((form.format(s=s, h=h, p=p, u=USER, pw=pw), pw))
    return cases


@pytest.mark.parametrize("form", list(FORMS.values()), ids=list(FORMS))
def test_no_credential_in_errors_or_redacted_lines(form: str) -> None:
    problems = []
    for line, pw in lines_for(form):
        try:
            parse_proxy_line(line)
        except ProxyParseError as exc:
            if bad := leaks(str(exc), pw, user=True):
                problems.append(("parse_proxy_line", line, str(exc), bad))
        for parsed in iter_proxy_lines([line]):
            if bad := leaks(parsed.error, pw, user=True):
                problems.append(("iter_proxy_lines", line, parsed.error, bad))
        shown = redact_line(line)
        if bad := leaks(shown, pw, user=False):
            problems.append(("redact_line", line, shown, bad))
    assert not problems, f"{len(problems)} leaks, e.g. {problems[:5]}"


def test_no_credential_in_errors_of_csv_rows_with_a_header() -> None:
    problems = []
    for h, p, pw in itertools.product(HOSTS, PORTS, PASSWORDS):
        rows = ["ip,port,username,password", f'{h},{p},{USER},"{pw}"']
        for parsed in iter_proxy_lines(rows):
            if bad := leaks(parsed.error, pw, user=True):
                problems.append((rows[1], parsed.error, bad))
    assert not problems, f"{len(problems)} leaks, e.g. {problems[:5]}"


def test_issue_examples() -> None:
    with pytest.raises(ProxyParseError) as info:
        parse_proxy_line("alice:s3cr3t:1.2.3.4:99999")
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ProxyParseError) as info:
        parse_proxy_line("alice:s3cr3t:host.example:8080x")
    assert "s3cr3t" not in str(info.value)
    assert "ss" not in redact_line("socks5://bob:p@ss@host:1080").replace("socks", "")
    assert redact_line("socks5://bob:p@ss@host:1080") == "socks5://bob:***@host:1080"
    assert "s3cr3t" not in redact_line("alice:s3cr3t:1.2.3.4:8080")
