"""An azenv.php look-alike as a WSGI app: `gunicorn sim.azenv_wsgi:app`.

azenv.php ("AZ Environment variables 1.04") is the PHP judge most public proxy checkers
use: an HTML page with a `<pre>` block of `KEY = value` lines — the CGI variables
REMOTE_ADDR, REMOTE_PORT, REQUEST_METHOD, REQUEST_URI, REQUEST_TIME and one `HTTP_*` line per
request header, exactly as the web server passed them. A WSGI server fills `environ` the
same way (CGI names, REMOTE_ADDR = the TCP peer), so this prints what azenv.php prints
without PHP. The real-proxy suite (tests/real_proxies.py) serves it with gunicorn.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable
from typing import Any

_CGI_KEYS = ("REMOTE_ADDR", "REMOTE_PORT", "REQUEST_METHOD")


def render(environ: dict[str, Any]) -> bytes:
    """The azenv page for one request's WSGI environ."""
    uri = environ.get("RAW_URI") or environ.get("PATH_INFO", "/")
    if not environ.get("RAW_URI") and environ.get("QUERY_STRING"):
        uri += "?" + environ["QUERY_STRING"]
    now = time.time()
    lines = [f"{k} = {environ[k]}" for k in _CGI_KEYS if environ.get(k) not in (None, "")]
    lines += [f"REQUEST_URI = {uri}", f"REQUEST_TIME_FLOAT = {now:.4f}"]
    lines.append(f"REQUEST_TIME = {int(now)}")
    lines += [f"{k} = {v}" for k, v in environ.items() if k.startswith("HTTP_")]
    body = "\n".join(html.escape(line, quote=False) for line in lines)
    page = (
        "<html>\n<head>\n<title>AZ Environment variables 1.04</title>\n</head>\n<body>\n"
        f"<pre>\n{body}\n</pre>\n</body>\n</html>\n"
    )
    return page.encode("utf-8", "replace")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = render(environ)
    start_response(
        "200 OK",
        [("Content-Type", "text/html; charset=UTF-8"), ("Content-Length", str(len(body)))],
    )
    return [body]
