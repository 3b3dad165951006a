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


def test_a_steps_code_is_its_module_and_everything_it_imports(package):
    """The closure follows imports at module level and inside functions, through other modules, and
    `from package import module`; imports for type annotations only are not code the output depends on."""
    from rmens.fingerprint import _imports_of, _source_of, closure_fingerprint, imported_closure

    (package / "inner" / "step.py").write_text(
        "from typing import TYPE_CHECKING\nimport json\nfrom fp_pkg.inner import helper\n"
        "if TYPE_CHECKING:\n    from fp_pkg import typing_only\n"
        "def run():\n    import fp_pkg.lazy\n")
    (package / "inner" / "helper.py").write_text("from fp_pkg.deep import VALUE\n")
    for name in ("deep", "lazy", "typing_only"):
        (package / f"{name}.py").write_text("VALUE = 1\n")

    def fresh(function, *args):
        for cached in (imported_closure, _imports_of, _source_of, closure_fingerprint):
            cached.cache_clear()
        return function(*args)

    assert fresh(imported_closure, "fp_pkg.inner.step", "fp_pkg") == (
        "fp_pkg.deep", "fp_pkg.inner", "fp_pkg.inner.helper", "fp_pkg.inner.step", "fp_pkg.lazy")
    before = fresh(closure_fingerprint, "fp_pkg.inner.step", "fp_pkg")
    (package / "typing_only.py").write_text("VALUE = 2\n")
    assert fresh(closure_fingerprint, "fp_pkg.inner.step", "fp_pkg") == before
    (package / "deep.py").write_text("VALUE = 2\n")  # two imports away
    assert fresh(closure_fingerprint, "fp_pkg.inner.step", "fp_pkg") != before
