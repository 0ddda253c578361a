"""The checkpoint loader's strictness: every failure names the file and the key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsvl2.errors import CheckpointError
from dsvl2.model.config import ModelConfig
from dsvl2.model.loader import load_model
from dsvl2.model.tiny import build_random_checkpoint, preset_config

GOLDEN_CKPT = Path(__file__).parent / "fixtures" / "golden" / "checkpoint"


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(GOLDEN_CKPT, dst)
    return dst


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _rewrite_shard(ckpt: Path, key: str, edit) -> Path:
    """Apply ``edit(tensors)`` to the shard that holds ``key``."""
    shard = ckpt / _index(ckpt)["weight_map"][key]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_golden_checkpoint_loads_every_parameter_once(ckpt: Path) -> None:
    model = load_model(ckpt, "cpu", torch.bfloat16)
    n_ckpt = sum(t.numel() for f in ckpt.glob("*.safetensors") for k, t in load_file(f).items()
                 if not k.startswith("vision.attn_pool."))
    assert sum(p.numel() for p in model.parameters()) == n_ckpt
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert not any(n.startswith("vision.attn_pool") for n, _ in model.named_parameters())
    # The stacked experts hold the checkpoint's matrices: expert 5 of layer 1, gate then up rows.
    shard = load_file(ckpt / _index(ckpt)["weight_map"]["language.model.layers.1.mlp.experts.5.up_proj.weight"])
    up = shard["language.model.layers.1.mlp.experts.5.up_proj.weight"]
    w13 = model.language.model.layers[1].mlp.experts.w13[5]
    assert torch.equal(w13[up.shape[0]:], up)


def test_missing_shard(ckpt: Path) -> None:
    (ckpt / "model-00002-of-000003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-000003.safetensors"):
        load_model(ckpt)


def _rewrite_header(shard: Path, edit) -> None:
    """Apply ``edit(header)`` to a shard's JSON header, the tensor bytes left as they are."""
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _by_offset(header: dict) -> list[dict]:
    return sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])


def _lengthen_first(header: dict) -> None:
    """The first tensor two bytes longer than its shape and dtype make it."""
    _by_offset(header)[0]["data_offsets"][1] += 2


def _move_last_past_the_end(header: dict) -> None:
    """The last tensor's bytes said to start where they end (its size kept)."""
    begin, end = _by_offset(header)[-1]["data_offsets"]
    _by_offset(header)[-1]["data_offsets"] = [end, 2 * end - begin]


# What safetensors 0.8.0 says of each damage (checked when the file is opened, before any tensor is read).
@pytest.mark.parametrize("damage,reason", [
    pytest.param(lambda d, shard: shard.write_bytes(d[:-1000]), "not fully covered", id="truncated"),
    pytest.param(lambda d, shard: shard.write_bytes(d + bytes(8)), "not fully covered", id="bytes-appended"),
    pytest.param(lambda d, shard: shard.write_bytes(d[:5]), "header too small", id="no-header"),
    pytest.param(lambda d, shard: shard.write_bytes(b""), "header too small", id="empty"),
    pytest.param(lambda d, shard: shard.write_bytes(d[:8] + b"\xff" * 12 + d[20:]), "invalid UTF-8",
                 id="garbage-header"),
    pytest.param(lambda d, shard: shard.write_bytes((len(d) + 1).to_bytes(8, "little") + d[8:]),
                 "invalid header length", id="header-length-past-the-end"),
    pytest.param(lambda d, shard: _rewrite_header(shard, _lengthen_first), "invalid shape, data type, or offset",
                 id="size-lies"),
    pytest.param(lambda d, shard: _rewrite_header(shard, _move_last_past_the_end), r"invalid offset for tensor `\S+`",
                 id="offset-past-the-end"),
    pytest.param(lambda d, shard: _rewrite_header(shard, lambda h: h.update(x={"dtype": "F32", "shape": [1]})),
                 "missing field `data_offsets`", id="entry-without-offsets"),
])
def test_truncated_or_corrupt_shard_is_refused_by_name(ckpt: Path, damage, reason: str) -> None:
    shard = ckpt / "model-00003-of-000003.safetensors"
    damage(shard.read_bytes(), shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated or corrupt \(\d+ bytes\): .*{reason}.*; "
                                              "download it again"):
        load_model(ckpt)


def test_unknown_key(ckpt: Path) -> None:
    key = "language.model.norm.weight"

    def add(t: dict) -> None:
        t["language.model.extra_head.weight"] = torch.zeros(3)

    _rewrite_shard(ckpt, key, add)
    index = _index(ckpt)
    index["weight_map"]["language.model.extra_head.weight"] = index["weight_map"][key]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unknown tensor language.model.extra_head.weight"):
        load_model(ckpt)


def test_wrong_shape(ckpt: Path) -> None:
    key = "language.model.layers.2.self_attn.o_proj.weight"

    def shrink(t: dict) -> None:
        t[key] = t[key][:, :-1].contiguous()

    shard = _rewrite_shard(ckpt, key, shrink)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {key} has shape \[64, 63\], the config expects"):
        load_model(ckpt)


def test_wrong_dtype(ckpt: Path) -> None:
    key = "language.model.layers.2.self_attn.o_proj.weight"
    shard = _rewrite_shard(ckpt, key, lambda t: t.__setitem__(key, t[key].to(torch.int16)))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {key} has unsupported dtype I16"):
        load_model(ckpt)


def test_single_file_checkpoint(ckpt: Path) -> None:
    """Without an index, one model.safetensors holds every tensor."""
    reference = dict(load_model(ckpt, dtype=torch.float32).named_parameters())
    tensors = {}
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    got = dict(load_model(ckpt, dtype=torch.float32).named_parameters())
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[n], p) for n, p in reference.items())


def test_missing_key_and_missing_expert(ckpt: Path) -> None:
    for key in ("vision.blocks.1.mlp.fc2.bias", "language.model.layers.2.mlp.experts.7.down_proj.weight"):
        fresh = ckpt.parent / f"c-{key}"
        shutil.copytree(ckpt, fresh)
        _rewrite_shard(fresh, key, lambda t, k=key: t.pop(k))
        index = _index(fresh)
        del index["weight_map"][key]
        (fresh / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=rf"not in the checkpoint, e.g. \['{key}'\]"):
            load_model(fresh)


def test_index_lists_a_key_the_shard_lacks(ckpt: Path) -> None:
    key = "image_newline"
    shard = _rewrite_shard(ckpt, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"{shard.name}: the index lists tensor {key}"):
        load_model(ckpt)


@pytest.mark.parametrize("section,field,value", [
    ("language_config", "q_lora_rank", 1536),
    ("language_config", "use_mla", False),
    ("language_config", "topk_method", "noaux_tc"),
    ("language_config", "scoring_func", "sigmoid"),
    ("language_config", "norm_topk_prob", True),
    ("language_config", "rope_scaling", {"type": "yarn", "factor": 40}),
    (None, "tile_tag", "1D"),
    (None, "global_view_pos", "tail"),
    ("projector_config", "projector_type", "mlp_gelu"),
])
def test_unsupported_variants_are_refused_by_name(section: str | None, field: str, value: object) -> None:
    raw = preset_config("demo")
    (raw[section] if section else raw)[field] = value
    with pytest.raises(CheckpointError, match=r"unsupported (\w+\.)?" + re.escape(f"{field}={value!r}")):
        ModelConfig.from_dict(raw)


def test_real_config_is_accepted() -> None:
    cfg = ModelConfig.from_dict(preset_config("small"))
    assert (cfg.vision.mlp_dim, cfg.language.qk_head_dim, len(cfg.candidate_resolutions)) == (4304, 192, 23)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)


def test_built_checkpoint_round_trips(tmp_path: Path) -> None:
    ckpt = build_random_checkpoint(tmp_path / "demo", "demo", seed=1)
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == [
        f"model-0000{i}-of-000003.safetensors" for i in (1, 2, 3)]
    model = load_model(ckpt, "cpu", torch.float32)
    assert model.language.model.layers[1].mlp.experts.w13.shape == (8, 64, 64)


def test_tensors_come_in_file_order(ckpt: Path) -> None:
    """Shards by name, tensors by offset: the order in which the read-ahead brings the bytes in. Each tensor is a
    view of its shard's memory map, so its address is its place in the file."""
    from dsvl2.model.loader import iter_tensors, shard_files

    names = shard_files(ckpt)
    backwards = dict(reversed(names.items()))
    seen = [(path, t.data_ptr()) for _, path, t in iter_tensors(ckpt, backwards)]
    assert len(seen) == len(names)
    assert seen == sorted(seen)


def test_the_read_ahead_runs_beside_the_load_once_per_checkpoint(ckpt: Path, monkeypatch) -> None:
    """The read-ahead blocks for about as long as the disk reads (the kernel submits the reads in the call): the
    load must not wait for it, and a service that started it early does not start a second one."""
    import threading

    from dsvl2.model.loader import shard_files
    from dsvl2.startup import prefetch

    release, calls = threading.Event(), []

    def slow_read_ahead(paths):
        calls.append(list(paths))
        release.wait(30)

    monkeypatch.setattr(prefetch, "read_ahead", slow_read_ahead)
    (early,) = prefetch.start_read_ahead(shard_files(ckpt).values())
    assert early.is_alive()
    model = load_model(ckpt)  # finishes while the read-ahead still "reads"
    assert early.is_alive() and len(calls) == 1
    assert calls[0] == sorted(set(shard_files(ckpt).values()))
    assert torch.isfinite(model.language.lm_head.weight).all()
    release.set()
    early.join(5)
    assert prefetch.start_read_ahead(shard_files(ckpt).values()) == []


def test_checkpoint_files_without_torch(ckpt: Path, tmp_path: Path) -> None:
    from dsvl2.startup import prefetch

    assert prefetch.checkpoint_files(ckpt) == sorted({ckpt / f for f in _index(ckpt)["weight_map"].values()})
    assert prefetch.checkpoint_files(tmp_path / "nowhere") == []
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_bytes(b"")
    assert prefetch.checkpoint_files(single) == [single / "model.safetensors"]


@pytest.mark.parametrize("workers", [1, 3])
def test_background_load_fills_what_the_strict_load_does(ckpt: Path, workers: int) -> None:
    """load_into with one worker or a worker per shard (the golden checkpoint has three) copies every tensor as
    load_model does, and a bad tensor in any shard still fails the load, naming it."""
    from dsvl2.model.loader import allocate_model, load_into

    reference = dict(load_model(ckpt, dtype=torch.float32).named_parameters())
    cfg = ModelConfig.from_file(ckpt / "config.json")
    model = allocate_model(cfg, "cpu", torch.float32)
    load_into(model, ckpt, workers=workers)
    got = dict(model.named_parameters())
    assert got.keys() == reference.keys()
    for name, p in reference.items():
        assert torch.equal(got[name], p), name

    key = sorted(_index(ckpt)["weight_map"])[-1]
    _rewrite_shard(ckpt, key, lambda t: t.__setitem__(key, torch.zeros(3, 3, dtype=t[key].dtype)))
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_into(allocate_model(cfg, "cpu", torch.float32), ckpt, workers=workers)
