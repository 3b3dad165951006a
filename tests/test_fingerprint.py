"""The code fingerprint in every cache key: an edited, added, moved or renamed source file changes it."""

import sys

import pytest

from rmens.fingerprint import source_fingerprint


@pytest.fixture()
def package(tmp_path, monkeypatch):
    root = tmp_path / "fp_pkg"
    (root / "inner").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "inner" / "__init__.py").write_text("")
    (root / "inner" / "step.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    sys.modules.pop("fp_pkg", None)


def fingerprint() -> str:
    return source_fingerprint.__wrapped__(("fp_pkg",))  # uncached: the files change under the test


def test_a_renamed_folder_or_an_edit_changes_the_fingerprint(package):
    before = fingerprint()
    assert fingerprint() == before
    (package / "inner").rename(package / "renamed")  # same files, same order, another path
    renamed = fingerprint()
    assert renamed != before
    (package / "renamed" / "step.py").write_text("X = 2\n")
    assert fingerprint() != renamed
