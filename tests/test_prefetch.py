"""The start-up prefetch of the software's own files (dsvl2.startup.prefetch): what it reads, in which order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dsvl2.startup import prefetch


def tree(root: Path) -> dict[str, int]:
    """A package-like tree -> the sizes of the files the prefetch must read."""
    files = {
        "pkg/__init__.py": 100,
        "pkg/__pycache__/mod.cpython-311.pyc": 2000,
        "pkg/sub/deep/data.bin": prefetch.SMALL_FILE,  # at the limit: read
        "pkg/ptxas": prefetch.SMALL_FILE + 10,  # large, but a program run for every compilation: read
        "pkg/tests/test_x.py": 50,  # test folders: skipped
        "pkg/big.so": prefetch.SMALL_FILE + 1,  # large and not named: skipped
    }
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    (root / "pkg" / "dangling").symlink_to(root / "nowhere")  # unreadable: skipped without error
    return {n: s for n, s in files.items() if "tests/" not in n and not n.endswith("big.so")}


def test_prefetch_reads_the_small_files_and_the_named_large_ones(tmp_path: Path) -> None:
    wanted = tree(tmp_path)
    got = prefetch.prefetch([tmp_path / "pkg", tmp_path / "missing"], workers=4)
    assert got["files"] == len(wanted) and got["bytes"] == sum(wanted.values())
    assert prefetch.stats["files"] == len(wanted)


def test_prefetch_reads_roots_in_order_and_large_files_last(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("first", "second"):
        (tmp_path / name / "inner").mkdir(parents=True)
        (tmp_path / name / "a.py").write_bytes(b"1")
        (tmp_path / name / "inner" / "b.py").write_bytes(b"2")
    (tmp_path / "first" / "cc1").write_bytes(b"3" * (prefetch.SMALL_FILE + 1))
    order = []
    read = prefetch._read_file
    monkeypatch.setattr(prefetch, "_read_file", lambda path, buf: order.append(Path(path)) or read(path, buf))
    prefetch.prefetch([tmp_path / "first", tmp_path / "second"], workers=1)
    assert [p.relative_to(tmp_path).as_posix() for p in order] == [
        "first/a.py", "first/inner/b.py", "second/a.py", "second/inner/b.py", "first/cc1"]


def test_roots_cover_the_interpreter_and_the_compiler_stack() -> None:
    import torch

    roots = prefetch.roots()
    assert roots[0] == Path(prefetch.sysconfig.get_paths()["stdlib"])
    assert Path(torch.__file__).parent in roots
    triton = pytest.importorskip("triton")
    names = [r for r in roots if r in (Path(torch.__file__).parent, Path(triton.__file__).parent)]
    assert names == [Path(torch.__file__).parent, Path(triton.__file__).parent]  # torch first: imported first
    assert "site-packages" in prefetch.SKIPPED_DIRS  # some interpreters keep it inside the standard library


def test_start_runs_one_prefetch_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(prefetch, "_started", None)
    monkeypatch.setattr(prefetch, "prefetch", lambda: calls.append(1))
    first = prefetch.start()
    assert prefetch.start() is first
    first.join()
    assert calls == [1]


def test_prefetch_imports_nothing_heavy() -> None:
    # It runs before torch is imported (predict.py's first statement).
    import subprocess

    code = ("import sys; from dsvl2.startup import prefetch; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
