"""The canary: known content a checker fetches through a proxy and compares byte for byte.

Served by the judge under ``/canary/`` (sim/judge.py), so a sim world needs no other
server. Three resources because tampering proxies pick their victims by Content-Type: an
HTML page with an inline script (ad injectors, script strippers), a JSON document (value
rewriters) and a PNG (image recompressors). Built once at import and never varied: the
checker learns the expected bytes by fetching them directly, twice, and refuses a canary
whose answers differ (fetchers/integrity.py).
"""

from __future__ import annotations

import json
import struct
import zlib

CANARY_PREFIX = "/canary/"

HTML = (
    b"<!doctype html>\n"
    b'<html lang="en"><head><meta charset="utf-8"><title>fetchfleet canary</title>\n'
    b'<script>document.documentElement.dataset.canary = "ff-canary-1";</script>\n'
    b"</head><body>\n<h1>Canary</h1>\n"
    b"<p>This page must arrive byte for byte: a proxy that changes it tampers with traffic.</p>\n"
    b"</body></html>\n"
)
JSON = (
    json.dumps(
        {"sku": "ff-canary-1", "price": 100, "currency": "EUR", "stock": [3, 1, 4]},
        separators=(", ", ": "),
    )
    + "\n"
).encode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))


def png(width: int = 16, height: int = 16, level: int = 9) -> bytes:
    """A small RGB gradient (filter byte 0 per row), deterministic for a zlib level."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (x * 16, y * 16, 128))
        for y in range(height)
    )
    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows, level))
        + png_chunk(b"IEND", b"")
    )


PNG = png()

#: path under /canary/ -> (body, Content-Type)
RESOURCES: dict[str, tuple[bytes, str]] = {
    "page.html": (HTML, "text/html; charset=utf-8"),
    "data.json": (JSON, "application/json"),
    "pixel.png": (PNG, "image/png"),
}
INDEX = ("fetchfleet canary: " + " ".join(RESOURCES) + "\n").encode()
