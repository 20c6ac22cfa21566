"""A real site to crawl: a directory of HTML (Debian's ``postgresql-doc-15``, about a thousand
pages) served as it is by Debian's nginx on 127.0.0.1.

    with DocsSite(tmp_path / "nginx") as site:
        site.url("/index.html")   # http://127.0.0.1:<port>/index.html
        site.hits()               # (request URI, status) of every request nginx logged

``python -m sim.docs --port 8480`` serves it in the foreground for ``specs/postgresql_docs.toml``
(Ctrl-C stops it). Nothing is generated: the pages, their links and their markup are the
package's, so a crawl of them meets what a real static site has (entities, no-break spaces,
fragments, links to other hosts, mailto:).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from sim.nginx import NginxServer, config_head, free_port, start_nginx

DOCS_DIR = Path("/usr/share/doc/postgresql-doc-15/html")
DOCS_PORT = 8480  # the port specs/postgresql_docs.toml expects


class DocsSite(NginxServer):
    """nginx serving ``docs`` (read-only, as installed) on 127.0.0.1:``port`` (0: a free one)."""

    def __init__(self, root: Path, docs: Path = DOCS_DIR, port: int = 0) -> None:
        self.root = root
        self.docs = docs
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, path: str = "/index.html") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _config(self) -> str:
        r = self.root
        return f"""
{config_head(r, 1024)}
    types {{ text/html html; text/css css; image/svg+xml svg; }}
    default_type application/octet-stream;
    log_format hits '$status $request_uri';
    access_log {r}/access.log hits;
    server {{
        listen 127.0.0.1:{self.port} backlog=1024;
        root {self.docs};
        location = /health {{ return 204; }}
    }}
}}
"""

    def start(self, timeout_s: float = 10.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.port = self.port or free_port()
        self.proc = start_nginx(self.root, self._config(), self.url("/health"), timeout_s)

    def hits(self) -> list[tuple[str, int]]:
        """(request URI, status) of each logged request, /health excluded, in log order."""
        log = self.root / "access.log"
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            status, uri = line.split(" ", 1)
            if uri != "/health":
                out.append((uri, int(status)))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve a directory of HTML with nginx on loopback.")
    ap.add_argument("--docs", type=Path, default=DOCS_DIR)
    ap.add_argument("--port", type=int, default=DOCS_PORT)
    args = ap.parse_args()
    if not (args.docs / "index.html").is_file():
        raise SystemExit(f"{args.docs}/index.html not found: apt-get install postgresql-doc-15")
    # SIGTERM (kill, a service manager) stops nginx too, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with (
        tempfile.TemporaryDirectory(prefix="fetchfleet-docs-") as tmp,
        DocsSite(Path(tmp), args.docs, args.port) as site,
    ):
        print(f"serving {args.docs} at {site.url()} (Ctrl-C stops)", flush=True)
        try:
            if site.proc is not None:
                site.proc.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
