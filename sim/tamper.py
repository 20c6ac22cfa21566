"""What the sim's tampering proxies do to a forwarded response (sim/fleet.py TAMPERING).

Each acts on one Content-Type, as real ones do: ad injectors add a script to HTML, value
rewriters change numbers in JSON, script strippers remove ``<script>`` elements, mobile
"optimisers" recompress images. The response is whole (the proxy holds it until the target
closes: forwarded requests carry ``Connection: close``) and leaves with a fixed
Content-Length. Anything else passes untouched, so the judge still sees an alive proxy.
"""

from __future__ import annotations

import json
import re
import struct
import zlib

from sim.canary import png_chunk

INJECTED = b'<script src="http://ads.example/inject.js"></script>'
SCRIPT = re.compile(rb"<script\b.*?</script>\s*", re.IGNORECASE | re.DOTALL)


def _rewrite_numbers(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value + 1  # the price went up
    if isinstance(value, dict):
        return {k: _rewrite_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite_numbers(v) for v in value]
    return value


def inject_script(body: bytes) -> bytes:
    at = body.lower().rfind(b"</body>")
    return body + INJECTED if at < 0 else body[:at] + INJECTED + body[at:]


def rewrite_json(body: bytes) -> bytes:
    try:
        document = json.loads(body)
    except ValueError:
        return body
    return (json.dumps(_rewrite_numbers(document)) + "\n").encode()


def strip_scripts(body: bytes) -> bytes:
    return SCRIPT.sub(b"", body)


def recompress_png(body: bytes) -> bytes:
    """Same pixels, other bytes: every IDAT recompressed at zlib level 1."""
    if not body.startswith(b"\x89PNG\r\n\x1a\n"):
        return body
    out, pos, idat = [body[:8]], 8, b""
    while pos + 8 <= len(body):
        length, kind = struct.unpack("!I4s", body[pos : pos + 8])
        data = body[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IDAT":
            idat += data
            continue
        if idat:
            out.append(png_chunk(b"IDAT", zlib.compress(zlib.decompress(idat), 1)))
            idat = b""
        out.append(png_chunk(kind, data))
    return b"".join(out)


# behaviour value -> (Content-Type prefix it acts on, transformation)
TAMPERS = {
    "injects_script": ("text/html", inject_script),
    "rewrites_json": ("application/json", rewrite_json),
    "strips_scripts": ("text/html", strip_scripts),
    "recompresses_image": ("image/png", recompress_png),
}


def tamper(behaviour: str, response: bytes) -> bytes:
    """The response as the proxy hands it on (unchanged if it is not its kind of content)."""
    ctype, change = TAMPERS[behaviour]
    end = response.find(b"\r\n\r\n")
    if end < 0:
        return response
    lines = response[:end].decode("latin-1").split("\r\n")
    headers = [line for line in lines[1:] if ":" in line]
    found = [v.strip().lower() for k, _, v in (h.partition(":") for h in headers)
             if k.strip().lower() == "content-type"]  # fmt: skip
    if not found or not found[0].startswith(ctype):
        return response
    if any(h.lower().startswith("transfer-encoding:") for h in headers):
        return response  # the sim's servers send Content-Length; leave anything else alone
    body = change(response[end + 4 :])
    kept = [h for h in headers if not h.lower().startswith("content-length:")]
    head = "\r\n".join([lines[0], *kept, f"Content-Length: {len(body)}"]) + "\r\n\r\n"
    return head.encode("latin-1") + body
