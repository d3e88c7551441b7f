"""Checkpoint readers and the atomic sharded writer, checked against the safetensors library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import random_state
from taskvec.core.stream import write_checkpoint
from taskvec.errors import CheckpointError, ConfigError
from taskvec.io import CheckpointWriter, TensorSpec, open_checkpoint, parse_size, read


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.f16": torch.randn(33, 7, generator=g).half(),
        "b.bf16": torch.randn(5, 4, 3, generator=g).bfloat16(),
        "c.f32": torch.randn(129, generator=g),
        "d.i64": torch.arange(12).reshape(3, 4),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
    }


def test_safetensors_reader_matches_library(tmp_path: Path) -> None:
    t = _mixed()
    save_file(t, tmp_path / "m.safetensors")
    src = open_checkpoint(tmp_path / "m.safetensors")
    assert set(src.keys()) == set(t)
    for k, v in t.items():
        assert src.spec(k) == TensorSpec(tuple(v.shape), v.dtype)
        assert torch.equal(read(src, k), v)
    # a flat slice reads only its elements, exactly
    assert torch.equal(src.read_flat("a.f16", 10, 100), t["a.f16"].reshape(-1)[10:100])


def test_writer_output_is_read_by_safetensors_library(tmp_path: Path) -> None:
    t = _mixed()
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in t.items()}
    out = write_checkpoint(tmp_path / "one.safetensors", specs, lambda k, s, e: t[k].reshape(-1)[s:e], chunk_elems=50)
    back = load_file(out)
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)


def test_sharded_writer_respects_size_limit_and_index(tmp_path: Path) -> None:
    t = {f"w{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    specs = {k: TensorSpec((100,), torch.float32) for k in t}
    out = write_checkpoint(tmp_path / "sharded", specs, lambda k, s, e: t[k][s:e], max_shard_bytes=1000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == 5 and all(p.stat().st_size < 1000 + 400 for p in shards)
    assert index["metadata"]["total_size"] == 4000
    merged: dict[str, torch.Tensor] = {}
    for p in shards:
        merged.update(load_file(p))
    assert all(torch.equal(merged[k], t[k]) for k in t)
    src = open_checkpoint(out)  # read back through the index
    assert all(torch.equal(read(src, k), t[k]) for k in t)


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    specs = {f"w{i}": TensorSpec((10,), torch.float32) for i in range(4)}

    def boom(k: str, s: int, e: int) -> torch.Tensor:
        if k == "w2":
            raise KeyboardInterrupt
        return torch.zeros(e - s)

    for out in (tmp_path / "x.safetensors", tmp_path / "folder"):
        with pytest.raises(KeyboardInterrupt):
            write_checkpoint(out, specs, boom, max_shard_bytes=50)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == []


def test_rerun_replaces_only_with_force(tmp_path: Path) -> None:
    specs = {"w": TensorSpec((3,), torch.float32)}
    out = tmp_path / "o.safetensors"
    write_checkpoint(out, specs, lambda k, s, e: torch.ones(e - s))
    with pytest.raises(ConfigError, match="already exists"):
        write_checkpoint(out, specs, lambda k, s, e: torch.zeros(e - s))
    write_checkpoint(out, specs, lambda k, s, e: torch.zeros(e - s), overwrite=True)
    assert torch.equal(load_file(out)["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["o.safetensors"]


def test_writer_rejects_out_of_order_and_overflow(tmp_path: Path) -> None:
    specs = {"a": TensorSpec((2,), torch.float32), "b": TensorSpec((2,), torch.float32)}
    with (
        pytest.raises(ValueError, match="expected tensor 'a'"),
        CheckpointWriter(tmp_path / "o.safetensors", specs) as w,
    ):
        w.write("b", torch.zeros(2))
    with pytest.raises(Exception, match="more data"), CheckpointWriter(tmp_path / "o.safetensors", specs) as w:
        w.write("a", torch.zeros(3))
    assert not (tmp_path / "o.safetensors").exists()


def test_truncated_file_is_reported_with_its_name(tmp_path: Path) -> None:
    save_file({"w": torch.randn(1000)}, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(raw[:20])
    with pytest.raises(CheckpointError, match=r"head\.safetensors"):
        open_checkpoint(tmp_path / "head.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="tiny"):
        open_checkpoint(tmp_path / "tiny.safetensors")


def test_missing_files_and_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "w.txt")
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"bad\.bin"):
        open_checkpoint(tmp_path / "bad.bin")


def test_hf_index_with_missing_shard(tmp_path: Path) -> None:
    t = random_state(1, torch.float32)
    specs = {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in t.items()}
    out = write_checkpoint(tmp_path / "hf", specs, lambda k, s, e: t[k].reshape(-1)[s:e], max_shard_bytes=600)
    shard = sorted(out.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        open_checkpoint(out)


def test_torch_state_dict_and_module_sources(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for x in (tmp_path / "pytorch_model.bin", tmp_path, model, model.state_dict()):
        src = open_checkpoint(x)
        assert set(src.keys()) == set(model.state_dict())
        for k, v in model.state_dict().items():
            assert torch.equal(read(src, k), v)


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size(123) == 123
    with pytest.raises(ConfigError, match="shard_size"):
        parse_size("lots")
