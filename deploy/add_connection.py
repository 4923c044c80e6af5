#!/usr/bin/env python3
"""Add (or update) a SuperLink connection in the Flower configuration.

``flwr run . <connection>``, ``flwr supernode register ... <connection>`` and
``flwr ls <connection>`` find the SuperLink's address and the CA certificate
under ``[superlink.<connection>]`` in ``$FLWR_HOME/config.toml`` (default
``~/.flwr/config.toml``). This script writes that entry::

    [superlink.mosaic-deploy]
    address = "127.0.0.1:9092"
    root-certificates = "/abs/path/deploy-state/certificates/ca.crt"

Usage::

    python deploy/add_connection.py                                # the defaults above
    python deploy/add_connection.py --address superlink.example.org:9092 \\
        --ca /path/to/ca.crt --name lab

Other connections and comments in the file are kept; an existing entry with the
same name is replaced. A missing configuration file is first created by Flower
itself (``flwr config list``), so the ``local`` simulation connection stays.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def flower_config_path() -> Path:
    """Where the flwr CLI reads its configuration (``$FLWR_HOME/config.toml``)."""
    home = os.environ.get("FLWR_HOME")
    return (Path(home) if home else Path.home() / ".flwr") / "config.toml"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def without_section(text: str, name: str) -> str:
    """``text`` without the table ``[superlink.<name>]`` and its sub-tables."""
    header = re.compile(r"^\s*\[\s*superlink\.(?:\"(?P<q>[^\"]+)\"|(?P<b>[A-Za-z0-9_-]+))"
                        r"(?P<sub>\.[^\]]*)?\s*\]\s*(#.*)?$")
    any_header = re.compile(r"^\s*\[")
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if any_header.match(line):
            match = header.match(line)
            skipping = bool(match) and (match.group("q") or match.group("b")) == name
        if not skipping:
            kept.append(line)
    return "".join(kept)


def add_connection(path: Path, name: str, address: str, ca: Path | None, insecure: bool) -> None:
    """Write ``[superlink.<name>]`` into the Flower config at ``path``."""
    if not path.exists():
        flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
        env = {**os.environ, "FLWR_HOME": str(path.parent)}
        subprocess.run([flwr, "config", "list"], env=env, capture_output=True, check=False)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    text = without_section(text, name).rstrip("\n")
    entry = [f"[superlink.{name}]", f"address = {_toml_string(address)}"]
    if insecure:
        entry.append("insecure = true")
    else:
        assert ca is not None
        entry.append(f"root-certificates = {_toml_string(str(ca))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((text + "\n\n" if text else "") + "\n".join(entry) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--name", default="mosaic-deploy",
                        help="connection name (default: mosaic-deploy)")
    parser.add_argument("--address", default="127.0.0.1:9092",
                        help="the SuperLink's HOST:PORT (default: 127.0.0.1:9092)")
    parser.add_argument("--ca", type=Path, default=Path("deploy-state/certificates/ca.crt"),
                        help="CA certificate of the SuperLink's TLS certificate "
                             "(default: ./deploy-state/certificates/ca.crt)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP, no TLS (only for a SuperLink started with --insecure)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        parser.error("--name may hold letters, digits, '-' and '_' only")
    ca = None
    if not args.insecure:
        ca = args.ca.expanduser().resolve()
        if not ca.is_file():
            parser.error(f"CA certificate {ca} not found (make it with deploy/make_certificates.py "
                         f"or copy it from the SuperLink's machine)")
    path = flower_config_path()
    add_connection(path, args.name, args.address, ca, args.insecure)
    print(f"connection '{args.name}' -> {args.address} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
