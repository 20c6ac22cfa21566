"""Proxy list parsing: every line form, CSV, encodings, bad input, streaming memory."""

from __future__ import annotations

import gc
import gzip
import itertools
import tracemalloc
from pathlib import Path

import pytest

from fetchers.errors import FetchError, ProxyParseError
from fetchers.proxy_parse import (
    MAX_LINE_CHARS,
    LoadReport,
    ProxySpec,
    iter_proxy_lines,
    iter_unique_proxies,
    load_proxy_list,
    parse_proxy_line,
)

# --------------------------------------------------------------------------- line forms

GOOD = [
    # line, scheme, host, port, username, password, key
    ("1.2.3.4:8080", None, "1.2.3.4", 8080, None, None, "auto://1.2.3.4:8080"),
    ("  1.2.3.4:8080  ", None, "1.2.3.4", 8080, None, None, "auto://1.2.3.4:8080"),
    ("http://1.2.3.4:3128", "http", "1.2.3.4", 3128, None, None, "http://1.2.3.4:3128"),
    ("HTTPS://1.2.3.4:443", "https", "1.2.3.4", 443, None, None, "https://1.2.3.4:443"),
    ("socks4://1.2.3.4:4145", "socks4", "1.2.3.4", 4145, None, None, "socks4://1.2.3.4:4145"),
    ("SOCKS4a://1.2.3.4:4145", "socks4", "1.2.3.4", 4145, None, None, "socks4://1.2.3.4:4145"),
    ("socks5://1.2.3.4:1080", "socks5", "1.2.3.4", 1080, None, None, "socks5://1.2.3.4:1080"),
    ("Socks5h://1.2.3.4:1080", "socks5", "1.2.3.4", 1080, None, None, "socks5://1.2.3.4:1080"),
    (
        "socks5://alice:s3cr3t@1.2.3.4:1080",
        "socks5",
        "1.2.3.4",
        1080,
        "alice",
        "s3cr3t",
        "socks5://alice@1.2.3.4:1080",
    ),
    (
        "http://u:p%40ss%3Aword@Proxy.Example.COM:8080/",
        "http",
        "proxy.example.com",
        8080,
        "u",
        "p@ss:word",
        "http://u@proxy.example.com:8080",
    ),
    ("user:pw-q7@1.2.3.4:80", None, "1.2.3.4", 80, "user", "pw-q7", "auto://user@1.2.3.4:80"),
    ("1.2.3.4:80:user:pw-q7", None, "1.2.3.4", 80, "user", "pw-q7", "auto://user@1.2.3.4:80"),
    ("1.2.3.4:80:user:pa:ss", None, "1.2.3.4", 80, "user", "pa:ss", "auto://user@1.2.3.4:80"),
    ("[2001:db8::1]:8080", None, "2001:db8::1", 8080, None, None, "auto://[2001:db8::1]:8080"),
    (
        "socks5://[2001:DB8:0::1]:1080",
        "socks5",
        "2001:db8::1",
        1080,
        None,
        None,
        "socks5://[2001:db8::1]:1080",
    ),
    (
        "http://u:pw-x1@[::1]:3128",
        "http",
        "::1",
        3128,
        "u",
        "pw-x1",
        "http://u@[::1]:3128",
    ),
    ("proxy-1.Example.org:3128", None, "proxy-1.example.org", 3128, None, None, None),
    ("socks5://localhost:9050", "socks5", "localhost", 9050, None, None, None),
    ("010.001.002.003:80", None, "10.1.2.3", 80, None, None, "auto://10.1.2.3:80"),
    ("1.2.3.4:8080 # office", None, "1.2.3.4", 8080, None, None, None),
    ("1.2.3.4:65535", None, "1.2.3.4", 65535, None, None, None),
    ("1.2.3.4:1", None, "1.2.3.4", 1, None, None, None),
]


@pytest.mark.parametrize(("line", "scheme", "host", "port", "user", "pw", "key"), GOOD)
def test_line_forms(line, scheme, host, port, user, pw, key) -> None:  # type: ignore[no-untyped-def]
    spec = parse_proxy_line(line)
    assert (spec.scheme, spec.host, spec.port, spec.username, spec.password) == (
        scheme,
        host,
        port,
        user,
        pw,
    )
    if key:
        assert spec.key == key
    if pw:
        assert pw not in spec.key
        assert pw not in repr(spec) and pw not in str(spec) and pw not in spec.redacted()


BAD = [
    ("1.2.3.4:0", "port", "port 0 out of range 1-65535"),
    ("1.2.3.4:70000", "port", "port 70000 out of range 1-65535"),
    ("1.2.3.4:http", "port", "is not a number"),
    ("1.2.3.4:", "port", "port is missing"),
    ("1.2.3.4", "port", "port is missing"),
    ("ftp://1.2.3.4:21", "scheme", "scheme 'ftp' is not supported"),
    ("socks6://1.2.3.4:21", "scheme", "use http, https, socks4 or socks5"),
    ("://1.2.3.4:21", "scheme", "not valid"),
    (":8080", "host", "host is empty"),
    ("http://:8080", "host", "host is empty"),
    ("999.1.1.1:80", "host", "not a valid IPv4 address"),
    ("1.2.3:80", "host", "not a valid IPv4 address"),
    ("1.2.3.4.5:80", "host", "not a valid IPv4 address"),
    ("2001:db8::1:8080", "host", "must be in brackets"),
    ("[2001:db8::zz]:80", "host", "not a valid IPv6 address"),
    ("[2001:db8::1:80", "host", "no closing"),
    ("bad_host!:80", "host", "not a valid hostname"),
    ("-lead.example:80", "host", "not a valid hostname"),
    ("@1.2.3.4:80", "credentials", "username is empty"),
    ("a:b:c", "line", "expected host:port"),
]


@pytest.mark.parametrize(("line", "fld", "message"), BAD)
def test_bad_lines_name_the_field(line: str, fld: str, message: str) -> None:
    with pytest.raises(ProxyParseError) as info:
        parse_proxy_line(line)
    assert info.value.field == fld
    assert message in str(info.value)
    assert isinstance(info.value, FetchError) and isinstance(info.value, ValueError)


def test_error_messages_do_not_contain_the_password() -> None:
    for line in ("http://u:TopSecret@999.1.1.1:80", "1.2.3.4:99999:u:TopSecret"):
        with pytest.raises(ProxyParseError) as info:
            parse_proxy_line(line)
        assert "TopSecret" not in str(info.value)


def test_spec_identity_url_redaction_and_repr() -> None:
    spec = parse_proxy_line("socks5://bob:p@ss w0rd@Host.Example:1080")
    assert spec.key == "socks5://bob@host.example:1080"
    assert spec.url() == "socks5://bob:p%40ss%20w0rd@host.example:1080"
    assert spec.url("http") == "http://bob:p%40ss%20w0rd@host.example:1080"
    assert spec.redacted() == "socks5://bob:***@host.example:1080"
    assert "w0rd" not in repr(spec) and "password='***'" in repr(spec)
    # round trip through url()
    assert parse_proxy_line(spec.url()) == spec

    bare = parse_proxy_line("[::1]:8080")
    assert bare.redacted() == "[::1]:8080"
    assert bare.url("socks5") == "socks5://[::1]:8080"
    with pytest.raises(ValueError, match="no scheme"):
        bare.url()
    # the key ignores the password: same proxy, new password, same identity
    a = parse_proxy_line("http://u:one@1.2.3.4:80")
    b = parse_proxy_line("http://u:two@1.2.3.4:80")
    assert a.key == b.key and a != b
    # schemes are part of the identity
    assert parse_proxy_line("1.2.3.4:80").key != parse_proxy_line("http://1.2.3.4:80").key


def test_direct_construction_is_validated_and_normalised() -> None:
    assert ProxySpec("http", "Proxy.EXAMPLE", 80).host == "proxy.example"
    assert ProxySpec("socks5", "[::1]", 1080).key == "socks5://[::1]:1080"
    with pytest.raises(ProxyParseError):
        ProxySpec("ftp", "1.2.3.4", 21)
    with pytest.raises(ProxyParseError):
        ProxySpec("http", "1.2.3.4", 0)
    with pytest.raises(ProxyParseError):
        ProxySpec(None, "", 80)
    spec = ProxySpec("http", "1.2.3.4", 80)
    with pytest.raises(AttributeError):
        spec.port = 81  # type: ignore[misc]
    assert {spec, ProxySpec("http", "1.2.3.4", 80)} == {spec}


# --------------------------------------------------------------------------- files


def lines_of(text: str) -> list[tuple[int, str | None, str | None]]:
    return [
        (p.line_no, p.spec.key if p.spec else None, p.error)
        for p in iter_proxy_lines(text.splitlines())
    ]


def test_list_lines_with_trailing_notes() -> None:
    got = lines_of("1.2.3.4:8080 US elite 120ms\n5.6.7.8:3128\t# office\nhttp://9.9.9.9:80 fast\n")
    assert [k for _, k, _ in got] == [
        "auto://1.2.3.4:8080",
        "auto://5.6.7.8:3128",
        "http://9.9.9.9:80",
    ]


def test_blank_lines_comments_and_line_numbers() -> None:
    text = "# list\n\n// also a comment\n   \n1.2.3.4:80\n  # indented comment\nbad\n5.6.7.8:81\n"
    got = lines_of(text)
    assert [(n, k) for n, k, _ in got] == [
        (5, "auto://1.2.3.4:80"),
        (7, None),
        (8, "auto://5.6.7.8:81"),
    ]
    assert "port is missing" in (got[1][2] or "")


def test_load_report_merges_duplicates_and_summarises() -> None:
    text = "\n".join(
        [
            "1.2.3.4:80",
            "http://5.6.7.8:3128",
            "1.2.3.4:70000",
            "1.2.3.4:80",  # duplicate
            "http://u:a@9.9.9.9:80",
            "http://u:b@9.9.9.9:80",  # same key (password is not identity)
            "999.1.1.1:80",
            "ftp://1.1.1.1:21",
            "x:y",
        ]
    )
    rep = load_proxy_list(text.splitlines(), max_errors_kept=2)
    assert [p.key for p in rep.proxies] == [
        "auto://1.2.3.4:80",
        "http://5.6.7.8:3128",
        "http://u@9.9.9.9:80",
    ]
    assert rep.proxies[2].password == "a"  # first seen wins
    assert (rep.lines, rep.duplicates, rep.error_count, len(rep.errors)) == (9, 2, 4, 2)
    assert rep.summary() == (
        "loaded 3 proxies from 9 lines (2 duplicates merged, 4 malformed: "
        "line 3: port 70000 out of range 1-65535; line 7: host '999.1.1.1' is not a valid "
        "IPv4 address (four numbers 0-255, e.g. 10.0.0.1); …)"
    )
    assert "\n" not in rep.summary()


def test_summary_thousands_and_singulars() -> None:
    rep = LoadReport(lines=1300, duplicates=40, unique=1234, error_count=0)
    assert rep.summary() == "loaded 1,234 proxies from 1,300 lines (40 duplicates merged)"
    assert LoadReport(lines=1, unique=1).summary() == "loaded 1 proxy from 1 line"


def test_empty_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    for source in (empty, str(empty), [], ["", "  ", "# nothing"]):
        rep = load_proxy_list(source)
        assert (rep.proxies, rep.lines, rep.error_count) == ([], 0, 0)
        assert rep.summary() == "loaded 0 proxies from 0 lines"


def test_missing_file_is_a_parse_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ProxyParseError, match="cannot read proxy list") as info:
        load_proxy_list(tmp_path / "nope.txt")
    assert info.value.field == "file"


@pytest.mark.parametrize(
    "payload",
    [
        gzip.compress(b"1.2.3.4:80\n" * 100),
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
        b"1.2.3.4:80\n\x00\x00\x00binary",
        bytes([1, 2, 3, 4, 5, 6, 14, 15, 16, 17, 0x80, 0xFF]) * 500,  # controls, no NUL
    ],
)
def test_binary_files_are_refused(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "list.bin"
    path.write_bytes(payload)
    with pytest.raises(ProxyParseError, match="looks like a binary file, not a proxy list"):
        list(iter_proxy_lines(path))
    with pytest.raises(ProxyParseError, match="binary"):
        list(iter_proxy_lines(["1.2.3.4:80", "\x00\x00"]))


def test_encodings(tmp_path: Path) -> None:
    text = "# liste de procurations été\n1.2.3.4:80\nhttp://usér:pässwörd@5.6.7.8:81\n"
    for name, data in {
        "utf8": text.encode("utf-8"),
        "utf8bom": b"\xef\xbb\xbf" + text.encode("utf-8"),
        "utf16": text.encode("utf-16"),  # with BOM, as Windows Notepad writes it
        "latin1": text.encode("latin-1"),
        "crlf": text.replace("\n", "\r\n").encode("utf-8"),
    }.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(data)
        rep = load_proxy_list(path)
        assert [p.key for p in rep.proxies] == [
            "auto://1.2.3.4:80",
            "http://us%C3%A9r@5.6.7.8:81",
        ], name
        assert rep.proxies[1].password == "pässwörd", name
        assert rep.error_count == 0, name


def test_bom_first_line_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf1.2.3.4:80\n")
    assert [p.key for p in load_proxy_list(path).proxies] == ["auto://1.2.3.4:80"]


def test_very_long_lines_are_errors_not_crashes(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    with path.open("w") as f:
        f.write("1.2.3.4:80\n")
        f.write("A" * 5_000_000 + "\n")  # 5 MB on one line
        f.write("5.6.7.8:81\n")
        f.write("B" * (MAX_LINE_CHARS + 1))  # last line, no newline
    tracemalloc.start()
    try:
        got = list(iter_proxy_lines(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(p.line_no, p.ok) for p in got] == [(1, True), (2, False), (3, True), (4, False)]
    assert "longer than 2,000 characters" in (got[1].error or "")
    assert len(got[1].text) <= MAX_LINE_CHARS
    assert peak < 1_000_000, peak  # the 5 MB line was never held whole
    long_item = ["1.2.3.4:80", "x" * 10_000]
    assert [p.ok for p in iter_proxy_lines(long_item)] == [True, False]


# --------------------------------------------------------------------------- CSV


def test_csv_with_proxy_column() -> None:
    rep = load_proxy_list(
        [
            "id,proxy,country,anonymity",
            "1,socks5://1.2.3.4:1080,US,elite",
            '2,"5.6.7.8:8080",DE,anonymous',
            "3,,FR,elite",
        ]
    )
    assert [p.key for p in rep.proxies] == ["socks5://1.2.3.4:1080", "auto://5.6.7.8:8080"]
    assert rep.error_count == 1 and rep.errors[0].line_no == 4


def test_csv_with_ip_port_protocol_and_credentials() -> None:
    rep = load_proxy_list(
        [
            "IP Address;Port;Protocol;Username;Password",
            "1.2.3.4;3128;HTTP;;",
            "5.6.7.8;1080;socks5;bob;pw;x",
            "2001:db8::7;8080;https;;",
            "9.9.9.9;99999;http;;",
        ]
    )
    assert [p.key for p in rep.proxies] == [
        "http://1.2.3.4:3128",
        "socks5://bob@5.6.7.8:1080",
        "https://[2001:db8::7]:8080",
    ]
    assert rep.proxies[1].password == "pw"
    assert rep.errors[0].error == "port 99999 out of range 1-65535"


def test_csv_address_column_and_scheme_column_with_several_values() -> None:
    rep = load_proxy_list(["address,type", '1.2.3.4:80,"HTTP, HTTPS"', "5.6.7.8:1080,SOCKS4"])
    assert [p.key for p in rep.proxies] == ["http://1.2.3.4:80", "socks4://5.6.7.8:1080"]


def test_headerless_csv_rows() -> None:
    rep = load_proxy_list(
        [
            "1.2.3.4,8080,US,elite",
            "socks5,5.6.7.8,1080",
            "http://9.9.9.9:80,FR",
            "US,elite,nothing here",
        ]
    )
    assert [p.key for p in rep.proxies] == [
        "auto://1.2.3.4:8080",
        "socks5://5.6.7.8:1080",
        "http://9.9.9.9:80",
    ]
    assert rep.error_count == 1 and "no proxy found in this CSV row" in (rep.errors[0].error or "")


# --------------------------------------------------------------------------- streaming


def test_iteration_is_lazy() -> None:
    endless = itertools.cycle(["1.2.3.4:80", "5.6.7.8:80"])
    first = list(itertools.islice(iter_proxy_lines(endless), 5))
    assert [p.line_no for p in first] == [1, 2, 3, 4, 5]
    uniques = list(itertools.islice(iter_unique_proxies(itertools.count()), 0))
    assert uniques == []


def test_streaming_variant_counts_without_keeping_the_list() -> None:
    rep = LoadReport()
    it = iter_unique_proxies(["1.2.3.4:80", "1.2.3.4:80", "bad", "5.6.7.8:80"], rep)
    assert next(it).key == "auto://1.2.3.4:80"
    rest = list(it)
    assert [p.key for p in rest] == ["auto://5.6.7.8:80"]
    assert (rep.lines, rep.duplicates, rep.error_count, rep.unique, rep.proxies) == (4, 1, 1, 2, [])


def _write_list(path: Path, n_lines: int, distinct: int) -> None:
    with path.open("w") as f:
        for i in range(n_lines):
            j = i % distinct
            if i % 50 == 7:
                f.write(f"10.{j // 65536 % 256}.{j // 256 % 256}.{j % 256}:99999\n")  # malformed
            else:
                f.write(f"socks5://10.{j // 65536 % 256}.{j // 256 % 256}.{j % 256}:1080\n")


def _peak_streaming(path: Path) -> tuple[int, LoadReport]:
    gc.collect()
    rep = LoadReport()
    tracemalloc.start()
    try:
        for _ in iter_unique_proxies(path, rep, max_errors_kept=10):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, rep


def test_streaming_memory_does_not_grow_with_lines(tmp_path: Path) -> None:
    """Same 500 distinct proxies, 5× more lines: the peak stays the same (dedup set only)."""
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    _write_list(small, 10_000, 500)
    _write_list(big, 50_000, 500)
    peak_small, rep_small = _peak_streaming(small)
    peak_big, rep_big = _peak_streaming(big)
    assert rep_big.lines == 50_000 and rep_big.unique == rep_small.unique > 400
    assert rep_big.error_count == 1_000 and len(rep_big.errors) == 10
    assert peak_big < peak_small * 1.2 + 50_000, (peak_small, peak_big)
    assert peak_big < 2_000_000  # a 2.8 MB file, 500 keys


def test_streaming_memory_grows_only_with_the_dedup_set(tmp_path: Path) -> None:
    """All-distinct lines: memory follows the set of keys (~100-150 bytes each), not the text."""
    path = tmp_path / "distinct.txt"
    _write_list(path, 30_000, 30_000)
    peak, rep = _peak_streaming(path)
    assert rep.unique == 30_000 - rep.error_count
    per_key = peak / rep.unique
    assert per_key < 250, per_key
