"""An origin for the gateway's tests and benchmark: Debian's nginx on 127.0.0.1 with the
pages a proxy tier must treat differently, plain and over TLS (a self-signed certificate made
here, so CONNECT tunnels carry real TLS).

    with Origin(tmp_path, block_addresses={"127.9.0.3"}) as o:
        o.url("/page")          # 200, Cache-Control: max-age=60
        o.url("/nostore")       # 200, Cache-Control: no-store
        o.url("/private")       # 200, Cache-Control: private
        o.url("/cookie")        # 200 with Set-Cookie
        o.url("/big")           # 6 MB (streamed by a gateway, not buffered)
        o.url("/page", site="guarded")  # a second site: 403 captcha page to block_addresses
        o.tls_url("/page")      # https://127.0.0.1:<port>/page
        o.hits("/page")         # requests nginx logged for that path, with client addresses

Each page names the client address nginx saw (`$remote_addr`), so a test knows which member
carried a request.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

from sim.nginx import NginxServer, config_head, free_port, start_nginx

BIG_BYTES = 6 * 1024 * 1024
CAPTCHA_PAGE = (
    "<html><head><title>Access denied</title></head><body>"
    '<div class="g-recaptcha">are you a robot?</div></body></html>'
)


def make_cert(directory: Path, ip: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` and localhost; (cert, key) paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fetchfleet-sim-origin")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(ip))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "origin.crt", directory / "origin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Origin(NginxServer):
    def __init__(self, root: Path, block_addresses: set[str] | None = None) -> None:
        self.root = root
        self.block_addresses = set(block_addresses or ())
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.cert = self.root / "origin.crt"

    def url(self, path: str = "/page", site: str = "main") -> str:
        return f"http://127.0.0.1:{self.ports[site]}{path}"

    def tls_url(self, path: str = "/page") -> str:
        return f"https://127.0.0.1:{self.ports['tls']}{path}"

    def _locations(self) -> str:
        return """
        default_type text/html;
        location = /health { return 204; }
        location = /page { add_header Cache-Control "max-age=60"; return 200 "page for $remote_addr\\n"; }
        location = /nostore { add_header Cache-Control "no-store"; return 200 "nostore for $remote_addr\\n"; }
        location = /private { add_header Cache-Control "private, max-age=60"; return 200 "private for $remote_addr\\n"; }
        location = /cookie { add_header Set-Cookie "sid=1"; return 200 "cookie for $remote_addr\\n"; }
        location = /big { try_files /big.bin =404; }
        location = /echo { return 200 "$request_method $request_uri $http_x_test $content_length\\n"; }
        """

    def _config(self) -> str:
        r = self.root
        blocked = "\n".join(f'        "{a}" 1;' for a in sorted(self.block_addresses))
        return f"""
{config_head(r, 4096)}
    log_format hits '$server_port $remote_addr $request_uri $status';
    access_log {r}/access.log hits;
    map $remote_addr $blocked {{
        default 0;
{blocked}
    }}
    server {{
        listen 127.0.0.1:{self.ports["main"]} backlog=4096;
        root {r}/www;
        {self._locations()}
    }}
    server {{
        listen 127.0.0.1:{self.ports["guarded"]} backlog=4096;
        root {r}/www;
        if ($blocked) {{ return 403 '{CAPTCHA_PAGE}'; }}
        {self._locations()}
    }}
    server {{
        listen 127.0.0.1:{self.ports["tls"]} ssl backlog=4096;
        ssl_certificate {self.cert};
        ssl_certificate_key {r}/origin.key;
        root {r}/www;
        {self._locations()}
    }}
}}
"""

    def start(self, timeout_s: float = 10.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "www").mkdir(exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        (self.root / "www" / "big.bin").write_bytes(os.urandom(1024) * (BIG_BYTES // 1024))
        self.cert, _ = make_cert(self.root)
        self.ports = {name: free_port() for name in ("main", "guarded", "tls")}
        self.proc = start_nginx(self.root, self._config(), self.url("/health"), timeout_s)

    def hits(self, path: str | None = None, site: str | None = None) -> list[tuple[str, str, int]]:
        """(client address, request URI, status) of each logged request (health excluded)."""
        log = self.root / "access.log"
        if not log.exists():
            return []
        port = str(self.ports[site]) if site else None
        out = []
        for line in log.read_text().splitlines():
            p, addr, uri, status = line.split(" ")
            if uri == "/health" or (port and p != port) or (path and uri != path):
                continue
            out.append((addr, uri, int(status)))
        return out
