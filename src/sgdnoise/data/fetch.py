"""Get the FashionMNIST files where this machine allows it (``make reproduce`` and ``make test``).

``python -m sgdnoise.data.fetch [--required]``:

1. the files are already there (Debian's folder or a torchvision download): nothing to do;
2. otherwise, as root on a machine with ``apt-get``: install Debian's ``dataset-fashion-mnist``;
3. otherwise, with torchvision installed and a network: download them (see
   :func:`~sgdnoise.data.find_fashion_mnist`);
4. otherwise print how to get them — and, with ``--required`` (``make reproduce``), exit with
   status 1 before any work is started; without it (``make test``: the tests that need the data
   skip) exit 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

from .fashion import DataNotFoundError, find_fashion_mnist

__all__ = ["ensure_fashion_mnist", "main"]


def _install_debian() -> str | None:
    """Install ``dataset-fashion-mnist`` with apt-get; ``None`` on success, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root, so apt-get cannot install dataset-fashion-mnist"
    apt = shutil.which("apt-get")
    if apt is None:
        return "no apt-get on this machine"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "dataset-fashion-mnist"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
            return f"'{' '.join(cmd[1:])}' failed: {last}"
    return None


def ensure_fashion_mnist() -> tuple[bool, str]:
    """``(found, message)``: find the files, installing Debian's package first if they are missing
    and this machine allows it."""
    try:
        found = find_fashion_mnist()
        return True, f"FashionMNIST: {found['train_images'].parent}"
    except DataNotFoundError:
        pass
    print("FashionMNIST not found; installing Debian's dataset-fashion-mnist ...", file=sys.stderr)
    why = _install_debian()
    try:
        found = find_fashion_mnist()
        return True, f"FashionMNIST: {found['train_images'].parent}"
    except DataNotFoundError as err:
        how = str(err).splitlines()
        reason = f" ({why})" if why else ""
        return False, f"FashionMNIST could not be installed{reason}. " + " ".join(how[1:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgdnoise.data.fetch", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--required", action="store_true", help="exit 1 when the data cannot be had"
    )
    args = parser.parse_args(argv)
    ok, message = ensure_fashion_mnist()
    print(message, file=sys.stderr if not ok else sys.stdout)
    return 0 if ok or not args.required else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
