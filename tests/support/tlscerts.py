"""Throwaway TLS certificates for tests, made with the openssl command line."""

from __future__ import annotations

from pathlib import Path

from tests.support.peers import run


def make_certs(d: Path) -> dict[str, Path]:
    """A throwaway CA with a server and a client certificate (openssl CLI)."""
    d.mkdir(parents=True)
    p = {n: d / n for n in ("ca.key", "ca.crt", "server.key", "server.crt", "client.key", "client.crt")}
    ssl = ["openssl"]
    run(ssl + ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p["ca.key"]), "-out", str(p["ca.crt"]),
               "-days", "2", "-subj", "/CN=test-ca"])
    for who in ("server", "client"):
        csr = d / f"{who}.csr"
        run(ssl + ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p[f"{who}.key"]), "-out", str(csr),
                   "-subj", f"/CN={who}"])
        ext = d / f"{who}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n")
        run(ssl + ["x509", "-req", "-in", str(csr), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
                   "-CAcreateserial", "-out", str(p[f"{who}.crt"]), "-days", "2", "-extfile", str(ext)])
    return p
