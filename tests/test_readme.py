"""The README's Python examples run as written and print what the README shows.

Every ```python block of README.md must be followed by a ```text block with its exact output.
Each block runs on its own, in a fresh interpreter (no state shared between blocks), from a
temporary directory, so a block that needs a model or data builds it itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _examples() -> list[tuple[int, str, str | None]]:
    text = README.read_text(encoding="utf-8")
    blocks = [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in _BLOCK.finditer(text)
    ]
    out = []
    for i, (lang, body, line) in enumerate(blocks):
        if lang != "python":
            continue
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        expected = nxt[1] if nxt is not None and nxt[0] == "text" else None
        out.append((line, body, expected))
    return out


EXAMPLES = _examples()


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize(
    ("line", "code", "expected"), EXAMPLES, ids=[f"README:{e[0]}" for e in EXAMPLES]
)
def test_readme_example(line: int, code: str, expected: str | None, tmp_path: Path) -> None:
    assert expected is not None, (
        f"README.md:{line}: a python block must be followed by its ```text output"
    )
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="2", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-3000:]}"
    got = [ln.rstrip() for ln in proc.stdout.strip().splitlines()]
    want = [ln.rstrip() for ln in expected.strip().splitlines()]
    assert got == want, f"README.md:{line} printed:\n" + "\n".join(got)
