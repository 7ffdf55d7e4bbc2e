"""Run every benchmark in bench/ and collect their JSON under --out (``make bench``)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for script in sorted(HERE.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        print(f"== {script.name} ==", flush=True)
        cmd = [
            sys.executable,
            str(script),
            "--out",
            str(out / f"{name}.json"),
            "--device",
            args.device,
        ]
        status |= subprocess.call(cmd)
    return status


if __name__ == "__main__":
    sys.exit(main())
