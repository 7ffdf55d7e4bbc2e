"""make reproduce / make test get the FashionMNIST data themselves where the machine allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgdnoise.data import fetch
from sgdnoise.data.fashion import DataNotFoundError


def _fake_finder(state: dict[str, bool]):
    def find():
        if state["installed"]:
            return {"train_images": Path("/data/fmnist/train-images-idx3-ubyte.gz")}
        raise DataNotFoundError(
            "FashionMNIST not found. Tried: x.\nTo get FashionMNIST, do one of:\n  (a) apt"
        )

    return find


def test_present_data_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "find_fashion_mnist", _fake_finder({"installed": True}))
    monkeypatch.setattr(fetch, "_install_debian", lambda: pytest.fail("must not install"))
    assert fetch.main(["--required"]) == 0


def test_missing_data_is_installed_where_the_machine_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = {"installed": False}

    def install() -> None:
        state["installed"] = True

    monkeypatch.setattr(fetch, "find_fashion_mnist", _fake_finder(state))
    monkeypatch.setattr(fetch, "_install_debian", install)
    ok, message = fetch.ensure_fashion_mnist()
    assert ok and "/data/fmnist" in message


def test_otherwise_one_line_says_how_and_reproduce_stops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(fetch, "find_fashion_mnist", _fake_finder({"installed": False}))
    monkeypatch.setattr(fetch, "_install_debian", lambda: "not root, so apt-get cannot install it")
    assert fetch.main(["--required"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "could not be installed (not root" in err[-1] and "apt" in err[-1]
    assert fetch.main([]) == 0  # make test goes on: the tests that need the data skip


def test_the_makefile_gets_the_data_before_reproducing_and_testing() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "reproduce: venv data" in makefile
    assert "-m sgdnoise.data.fetch --required" in makefile
    assert "-m sgdnoise.data.fetch\n" in makefile or "-m sgdnoise.data.fetch ||" in makefile
