"""TLS test helpers (issue 20 item 5): a CA and server certificate made with openssl, and Debian's
nginx terminating TLS in front of a plaintext gRPC port, run as this user in a temp dir. Used by
test_tls.py (Ray-free server, the Helm chart's nginx.conf)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

from serving_testlib import free_port, wait_for

NGINX, OPENSSL = shutil.which("nginx") or "/usr/sbin/nginx", shutil.which("openssl")
MISSING = None if os.path.exists(NGINX) and OPENSSL else (
    "needs the nginx and openssl binaries (Debian packages nginx, openssl; .ci/run installs them)")


def _openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def make_server_cert(d: Path, ca: str) -> tuple[Path, Path]:
    """A server certificate for localhost / 127.0.0.1 signed by CA `ca`."""
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d / "server.crt", d / "server.key"


NGINX_CONF = """\
# as in deploy/README.md ("TLS"), plus what running as a non-root user in a temp dir needs
user {user};
worker_processes 1;
pid {d}/nginx.pid;
lock_file {d}/nginx.lock;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;  proxy_temp_path {d}/proxy;  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;  scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{tls_port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    client_max_body_size 64m;    # = memserve's max_request_bytes (nginx's 1m default would 413 big ingests)
    grpc_read_timeout 3600s;     # a long generation / ingest streams far longer than the 60 s default
    grpc_send_timeout 3600s;
    location / {{
      grpc_pass grpc://127.0.0.1:{upstream_port};
    }}
  }}
}}
"""


@contextlib.contextmanager
def run_nginx(d: Path, conf_text: str, port: int):
    """nginx with this config (as this user, prefix d) until the block ends; waits for it to listen on port."""
    conf = d / f"nginx-{port}.conf"
    conf.write_text(conf_text)
    cmd = [NGINX, "-p", str(d), "-c", str(conf), "-e", str(d / f"error-{port}.log")]
    t = subprocess.run(cmd + ["-t"], capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, f"nginx -t refused the config:\n{t.stderr}"
    proc = subprocess.Popen(cmd + ["-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def listening():
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        wait_for(listening, 20, "nginx to listen")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def nginx_tls(d: Path, cert: Path, key: Path, upstream_port: int):
    """nginx terminating TLS on a free loopback port in front of 127.0.0.1:upstream_port; yields the port."""
    tls_port = free_port()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(exist_ok=True)
    return run_nginx(d, NGINX_CONF.format(user=pwd.getpwuid(os.geteuid()).pw_name, d=d, tls_port=tls_port, cert=cert,
                                          key=key, upstream_port=upstream_port), tls_port)
