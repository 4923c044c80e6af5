#!/usr/bin/env python3
"""Make a private CA and a TLS certificate for the SuperLink.

Writes, into OUT_DIR (default ``./deploy-state/certificates``):

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority. ``ca.crt`` is
  public: copy it to every SuperNode machine (``--root-certificates``) and to
  the machine you run ``flwr`` from. Keep ``ca.key`` private (or delete it once
  the server certificate is made).
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA,
  valid for ``127.0.0.1``, ``localhost`` and every ``--san`` you add (the names
  or IP addresses SuperNodes use to reach the SuperLink). ``server.key`` stays
  on the SuperLink machine.

Usage::

    python deploy/make_certificates.py                       # loopback only
    python deploy/make_certificates.py --san superlink.example.org --san 10.0.0.5

Needs only the ``cryptography`` package, which Flower itself depends on, so it
works the same on every platform (no ``openssl`` command needed). Existing
files are kept unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mosaic-flwr deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(["127.0.0.1", "::1", "localhost", *names]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.write_bytes(data)
    os.chmod(path, 0o600)


def make_certificates(out_dir: Path, sans: list[str], days: int = 365) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.pem and server.key into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate clock skew
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mosaic-flwr deployment CA"))
        .issuer_name(_name("mosaic-flwr deployment CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mosaic-flwr SuperLink"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True,
                                     key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    paths = {name: out_dir / name for name in FILES}
    paths["ca.crt"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca.key"], ca_key)
    paths["server.pem"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server.key"], server_key)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("deploy-state/certificates"),
                        help="folder for the files (default: ./deploy-state/certificates)")
    parser.add_argument("--san", action="append", default=[], metavar="HOST_OR_IP",
                        help="another host name or IP address the SuperLink is reached at "
                             "(repeatable); 127.0.0.1, ::1 and localhost are always included")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    existing = [name for name in FILES if (args.out / name).exists()]
    if existing and not args.force:
        print(f"{args.out} already holds {', '.join(existing)}; keeping them "
              f"(use --force to make new ones)", file=sys.stderr)
        return 0
    paths = make_certificates(args.out, args.san, args.days)
    names = ", ".join(["127.0.0.1", "::1", "localhost", *args.san])
    print(f"CA certificate:     {paths['ca.crt'].resolve()}  (copy to every SuperNode and "
          f"to where you run flwr)")
    print(f"SuperLink cert/key: {paths['server.pem'].resolve()}, {paths['server.key'].resolve()}"
          f"  (valid for {names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
