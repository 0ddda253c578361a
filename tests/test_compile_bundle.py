"""Compile bundles (dsvl2.startup.compile_bundle): named by GPU and software, found in order, loaded before the warm-up,
and a real round trip through torch.compile's portable cache on the CPU."""

from __future__ import annotations

import lzma
import subprocess
import sys
from pathlib import Path

from dsvl2.serving.engine import Engine, EngineConfig
from dsvl2.startup import compile_bundle

H200 = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0"}


def test_name_carries_device_torch_and_triton_in_safe_characters() -> None:
    name = compile_bundle.bundle_name(H200)
    assert name == "nvidia-h200_torch-2.11.0-cu130_triton-3.6.0.bin.xz"
    other = compile_bundle.bundle_name({**H200, "device": "NVIDIA H100 80GB HBM3"})
    assert other.startswith("nvidia-h100-80gb-hbm3_") and other != name
    assert compile_bundle.bundle_name({**H200, "torch": "2.13.0+cpu"}) != name


def test_the_shipped_bundles_are_named_for_a_stack() -> None:
    shipped = sorted(compile_bundle.SHIPPED.glob("*" + compile_bundle.SUFFIX))
    assert shipped, "dsvl2/compiled/ ships at least the bundle measured in BENCHMARKS.md"
    for path in shipped:
        device, torch_part, triton_part = path.name.removesuffix(compile_bundle.SUFFIX).split("_")
        assert torch_part.startswith("torch-") and triton_part.startswith("triton-") and device
        assert lzma.decompress(path.read_bytes())  # a complete xz stream


def test_find_takes_the_first_directory_that_holds_the_bundle(tmp_path: Path) -> None:
    first, second, empty = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (first, second, empty):
        d.mkdir()
    name = compile_bundle.bundle_name(H200)
    (second / name).write_bytes(b"x")
    (first / compile_bundle.bundle_name({**H200, "device": "other"})).write_bytes(b"x")  # another GPU's
    assert compile_bundle.find(H200, [empty, first, second]) == second / name
    (first / name).write_bytes(b"x")
    assert compile_bundle.find(H200, [empty, first, second]) == first / name
    assert compile_bundle.find(H200, [empty]) is None


def test_a_damaged_bundle_is_logged_and_skipped(tmp_path: Path) -> None:
    logs: list[str] = []
    bad = tmp_path / compile_bundle.bundle_name(H200)
    bad.write_bytes(b"not xz")
    assert compile_bundle.load(bad, logs.append) is False
    assert "not used" in logs[0] and str(bad) in logs[0]
    bad.write_bytes(lzma.compress(b"not a torch cache"))
    assert compile_bundle.load(bad, logs.append) is False


def test_engine_looks_beside_the_weights_first_and_loads_before_compiling(tiny_checkpoint: Path,
                                                                         monkeypatch) -> None:
    logs: list[str] = []
    engine = Engine.from_pretrained(tiny_checkpoint, EngineConfig(device="cpu", compile=True), log=logs.append)
    assert engine.bundle_dirs == [tiny_checkpoint, compile_bundle.SHIPPED]
    engine.load_compile_bundle()
    assert "no compile bundle" in logs[-1] and compile_bundle.bundle_name(compile_bundle.stack_key("cpu")) in logs[-1]

    order: list[str] = []
    (tiny_checkpoint / compile_bundle.bundle_name(compile_bundle.stack_key("cpu"))).write_bytes(b"x")
    monkeypatch.setattr(compile_bundle, "load", lambda path, log: order.append(f"load {path.parent}"))
    monkeypatch.setattr(Engine, "compile", lambda self: order.append("compile"))
    monkeypatch.setattr(Engine, "or_eager", lambda self, step: order.append(step.__name__))
    monkeypatch.setattr(Engine, "stream", lambda self, req: iter(()))
    try:
        engine.warmup()
    finally:
        (tiny_checkpoint / compile_bundle.bundle_name(compile_bundle.stack_key("cpu"))).unlink()
    assert order[:3] == [f"load {tiny_checkpoint}", "compile", "warm_requests"]


ROUND_TRIP = """
import os, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from dsvl2.startup import compile_bundle
def f(x):
    return torch.nn.functional.silu(x) * x.cos() + 1
mode, out = sys.argv[1], Path(sys.argv[2])
if mode == "load":
    assert compile_bundle.load(compile_bundle.find(compile_bundle.stack_key("cpu"), [out]), print)
y = torch.compile(f)(torch.arange(8.0))
assert torch.allclose(y, f(torch.arange(8.0)))
if mode == "save":
    print(compile_bundle.save(out, "cpu", print).name)
print("counters", dict(counters["inductor"]))
"""


def test_round_trip_a_fresh_cache_compiles_from_the_bundle(tmp_path: Path) -> None:
    """Compile in one process and save; in another with an empty compile cache, load and compile again: Inductor
    finds the graph in its cache (a hit, no miss)."""
    root = Path(__file__).resolve().parents[1]

    def run(mode: str, cache: str) -> str:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache),
               "TRITON_CACHE_DIR": str(tmp_path / cache / "triton"), "HOME": str(tmp_path)}
        done = subprocess.run([sys.executable, "-c", ROUND_TRIP, mode, str(tmp_path / "bundles")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    saved = run("save", "cache1")
    assert "fxgraph_cache_miss" in saved and compile_bundle.bundle_name(compile_bundle.stack_key("cpu")) in saved
    loaded = run("load", "cache2")
    assert "1 inductor" in loaded
    assert "'fxgraph_cache_hit': 1" in loaded and "fxgraph_cache_miss" not in loaded


def test_triton_archive_ships_our_kernels_and_launchers_not_inductors(tmp_path: Path, monkeypatch) -> None:
    """Our Triton kernels are outside torch's cache: their Triton cache entries travel in an archive of their own,
    unpacked before the warm-up without touching entries already there; a damaged archive is logged and skipped."""
    made = tmp_path / "made"
    entries = {"a1": ["_mm_kernel.json", "__grp___mm_kernel.json", "_mm_kernel.cubin"],
               "b2": ["triton_poi_fused_0.json", "__grp__triton_poi_fused_0.json", "triton_poi_fused_0.cubin"],
               "c3": ["__triton_launcher.so"]}
    for entry, files in entries.items():
        (made / entry).mkdir(parents=True)
        for f in files:
            (made / entry / f).write_bytes(f"{entry}/{f}".encode())
    monkeypatch.setenv("TRITON_CACHE_DIR", str(made))
    logs: list[str] = []
    archive = compile_bundle.save_triton(tmp_path / "out", "cpu", logs.append)
    assert archive.name == compile_bundle.triton_name(compile_bundle.stack_key("cpu"))
    assert archive.name.endswith(f"_py{sys.version_info.major}.{sys.version_info.minor}.triton.tar.xz")

    fresh = tmp_path / "fresh"
    (fresh / "a1").mkdir(parents=True)
    (fresh / "a1" / "kept").write_bytes(b"mine")  # an entry this cache holds already is left as it is
    monkeypatch.setenv("TRITON_CACHE_DIR", str(fresh))
    assert compile_bundle.load_triton(archive, logs.append) == 1
    assert sorted(p.name for p in fresh.iterdir()) == ["a1", "c3"]  # Inductor's entry is torch's cache's business
    assert (fresh / "c3" / "__triton_launcher.so").read_bytes() == b"c3/__triton_launcher.so"
    assert [p.name for p in (fresh / "a1").iterdir()] == ["kept"]

    archive.write_bytes(b"damaged")
    assert compile_bundle.load_triton(archive, logs.append) == 0 and "not used" in logs[-1]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "empty"))
    assert compile_bundle.save_triton(tmp_path / "out", "cpu", logs.append) is None


def test_kernels_compiled_meanwhile_are_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert compile_bundle.triton_entries() == set()  # no cache yet
    (tmp_path / "cache" / "old").mkdir(parents=True)
    before = compile_bundle.triton_entries()
    for entry, name in (("new1", "_gemv_kernel"), ("new2", "triton_poi_fused_0")):
        (tmp_path / "cache" / entry).mkdir()
        (tmp_path / "cache" / entry / f"{name}.json").write_text("{}")
        (tmp_path / "cache" / entry / f"__grp__{name}.json").write_text("{}")
    assert compile_bundle.compiled_since(before) == ["_gemv_kernel", "triton_poi_fused_0"]


def test_the_image_runs_the_python_the_kernel_archives_were_made_with() -> None:
    """A Triton archive serves only the Python it was made with (its launchers and Triton's own cache keys depend on
    it): the image that cog.yaml builds must run that Python, or a first start there compiles every kernel."""
    import re

    cog = (Path(__file__).resolve().parents[1] / "cog.yaml").read_text()
    image_python = re.search(r'^\s*python_version:\s*"([\d.]+)"', cog, re.M).group(1)
    archives = sorted(compile_bundle.SHIPPED.glob("*" + compile_bundle.TRITON_SUFFIX))
    assert archives
    for path in archives:
        made_with = re.search(r"_py([\d.]+)\.triton\.tar\.xz$", path.name).group(1)
        assert made_with == image_python, f"{path.name}: made with Python {made_with}, the image runs {image_python}"
        bundle = path.name.replace(f"_py{made_with}{compile_bundle.TRITON_SUFFIX}", compile_bundle.SUFFIX)
        assert (compile_bundle.SHIPPED / bundle).is_file()  # each archive travels with its compile bundle
