#!/usr/bin/env python3
"""Make SuperNode authentication keys (ECDSA, NIST P-384, OpenSSH format).

For each NAME, writes into OUT_DIR (default ``./deploy-state/keys``):

- ``NAME``: the private key (mode 600). It stays on the SuperNode's machine and
  is given to ``flower-supernode --auth-supernode-private-key``.
- ``NAME.pub``: the public key. The SuperLink's operator registers it with
  ``flwr supernode register NAME.pub <connection>``; only SuperNodes whose public
  key is registered may connect to a SuperLink started with
  ``--enable-supernode-auth``.

Usage::

    python deploy/make_supernode_keys.py --count 3        # supernode-0 .. supernode-2
    python deploy/make_supernode_keys.py lab-gpu-box      # one named key (run on that machine)

Equivalent to ``ssh-keygen -t ecdsa -b 384 -N "" -f NAME``. Existing keys are
kept unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def make_key(out_dir: Path, name: str, force: bool = False) -> tuple[Path, Path, bool]:
    """Write ``name`` and ``name.pub``; return (private, public, made_now)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / name, out_dir / f"{name}.pub"
    if private.exists() and public.exists() and not force:
        return private, public, False
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)
                       + f" {name}\n".encode())
    return private, public, True


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="key names (besides those of --count)")
    parser.add_argument("--count", type=int, default=0,
                        help="also make supernode-0 .. supernode-(COUNT-1)")
    parser.add_argument("--out", type=Path, default=Path("deploy-state/keys"),
                        help="folder for the keys (default: ./deploy-state/keys)")
    parser.add_argument("--force", action="store_true", help="overwrite existing keys")
    args = parser.parse_args(argv)
    names = [*args.names, *(f"supernode-{i}" for i in range(args.count))]
    if not names:
        parser.error("give key names or --count N")
    for name in names:
        private, public, made = make_key(args.out, name, args.force)
        state = "made" if made else "kept existing"
        print(f"{state}: {private.resolve()}  (public key: {public.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
