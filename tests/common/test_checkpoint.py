"""The one checkpointer: parts in their file formats, atomic saves that never damage an earlier checkpoint,
pruning, damaged files named, checkpoints older than state.json, and the generic parts."""

import json
import random
import shutil

import pytest
import torch

from transfusion_mot.common import checkpoint as ckpt
from transfusion_mot.common.checkpoint import (
    Bundle,
    Checkpointer,
    CheckpointSaveError,
    GeneratorState,
    ModuleWeights,
    TorchRNGState,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    resolve_checkpoint,
)
from transfusion_mot.common.errors import InputNotFound, TrainingError


class Counter:
    """A JSON-able part with some state."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class Progress(Counter):
    def load_state_dict(self, state: dict) -> None:
        if state.get("refuse"):
            raise TrainingError("refused")
        self.value = state["value"]


def parts():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    return module, optimizer, generator


def checkpointer(root, module, optimizer, generator, counter, progress=None, keep=2):
    return Checkpointer(root, {"model.safetensors": ModuleWeights(module), "trainer.pt": Bundle(
        optimizer=optimizer, generator=GeneratorState(generator), rng=TorchRNGState()),
        "counter.json": counter, "rank_{rank}.pt": GeneratorState(generator)}, keep=keep, progress=progress,
        metadata={"format": "test/1"})


def test_round_trip_restores_every_part(tmp_path):
    module, optimizer, generator = parts()
    counter, progress = Counter(), Progress()
    counter.value, progress.value = 7, 3
    saver = checkpointer(tmp_path / "ck", module, optimizer, generator, counter, progress)
    path = saver.save(10)
    assert path == tmp_path / "ck" / "step_10"
    assert sorted(p.name for p in path.iterdir()) == ["counter.json", "model.safetensors", "rank_0.pt", "state.json",
                                                      "trainer.pt"]
    state = read_state(path)
    assert {k: v for k, v in state.items() if k != "files"} == {"step": 10, "value": 3}
    # the content check: every part file's size and sha256
    assert set(state["files"]) == {p.relative_to(path).as_posix() for p in path.rglob("*")
                                   if p.is_file() and p.name != "state.json"}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "test/1", "step": "10"}
    expected_draw = torch.rand(3, generator=generator)  # what the saved generator draws next
    expected_global = torch.rand(2)  # ... and the global RNG

    torch.manual_seed(99)
    module2, optimizer2, generator2 = torch.nn.Linear(3, 2), None, torch.Generator().manual_seed(1)
    optimizer2 = torch.optim.AdamW(module2.parameters(), lr=0.1)
    counter2, progress2 = Counter(), Progress()
    state = checkpointer(tmp_path / "ck", module2, optimizer2, generator2, counter2, progress2).load(path)
    assert state["step"] == 10 and counter2.value == 7 and progress2.value == 3
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), module2.state_dict().values()))
    assert torch.equal(torch.rand(3, generator=generator2), expected_draw)
    assert torch.equal(torch.rand(2), expected_global)
    s1, s2 = optimizer.state_dict()["state"][0], optimizer2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])


def test_keep_prunes_oldest_and_listing_ignores_incomplete(tmp_path):
    module, optimizer, generator = parts()
    saver = checkpointer(tmp_path, module, optimizer, generator, Counter(), keep=2)
    for step in (1, 2, 3):
        saver.save(step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / ".tmp-step_4").mkdir()  # a kill mid-write
    (tmp_path / "step_5").mkdir()  # no state.json: never committed
    assert latest_checkpoint(tmp_path).name == "step_3" and saver.latest().name == "step_3"
    saver.save(3)  # the same step again replaces it whole
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert resolve_checkpoint(tmp_path).name == "step_3" and resolve_checkpoint(tmp_path, 2).name == "step_2"
    with pytest.raises(InputNotFound, match=r"no checkpoint for step 9 \(have \[2, 3\]\)"):
        resolve_checkpoint(tmp_path, 9)
    with pytest.raises(InputNotFound, match="no checkpoint found"):
        resolve_checkpoint(tmp_path / "nothing")


def test_a_failed_save_leaves_earlier_checkpoints_bit_identical(tmp_path, monkeypatch):
    module, optimizer, generator = parts()
    saver = checkpointer(tmp_path, module, optimizer, generator, Counter(), keep=1)
    saver.save(1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_1").iterdir()}
    real = ckpt.save_tensors

    def disk_full(tensors, path, metadata=None):
        real(tensors, path, metadata)  # half written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_tensors", disk_full)
    with torch.no_grad():
        module.weight.add_(1.0)
    with pytest.raises(CheckpointSaveError, match="No space left.*step_1 is intact"):
        saver.save(2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1] and not list(tmp_path.glob(".tmp-*"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_1").iterdir()} == before
    assert isinstance(CheckpointSaveError("x"), TrainingError)


def test_processes_agree_on_failure(tmp_path):
    """With several processes, one that fails makes every one raise (here: another process's failure)."""
    module, optimizer, generator = parts()
    saver = Checkpointer(tmp_path, {"model.safetensors": ModuleWeights(module)}, any_rank=lambda flag: True)
    with pytest.raises(CheckpointSaveError, match="another process failed"):
        saver.save(1)
    assert list_checkpoints(tmp_path) == []


def test_damaged_files_are_named(tmp_path):
    module, optimizer, generator = parts()
    saver = checkpointer(tmp_path, module, optimizer, generator, Counter(), Progress())
    path = saver.save(4)
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(TrainingError, match=r"damaged checkpoint .*step_4: model.safetensors has 9 bytes but"):
        saver.load(path)
    # a checkpoint from before content checks (no "files" in state.json): the reader names the file
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "files"}))
    with pytest.raises(TrainingError, match=r"damaged checkpoint .*step_4: cannot read model.safetensors"):
        saver.load(path)
    (path / "trainer.pt").unlink()
    saver2 = checkpointer(tmp_path, module, optimizer, generator, Counter(), Progress())
    with pytest.raises(TrainingError, match="trainer.pt is missing"):
        Checkpointer(tmp_path, {"trainer.pt": Counter()}).load(path)
    (path / "state.json").write_text(json.dumps({"step": 4, "value": 0, "refuse": True}))
    with pytest.raises(TrainingError, match="refused"):  # progress is checked before any part changes
        saver2.load(path)
    with pytest.raises(ValueError, match="end in .safetensors, .pt or .json"):
        Checkpointer(tmp_path, {"weights.bin": Counter()})


def test_checkpoints_older_than_state_json_load_by_their_marker(tmp_path):
    counter = Counter()
    old = tmp_path / "step_6"
    old.mkdir()
    torch.save({"value": 5}, old / "trainer.pt")  # the layout before the shared checkpointer
    saver = Checkpointer(tmp_path, {"trainer.pt": counter}, legacy_marker="trainer.pt")
    assert saver.latest() == old and latest_checkpoint(tmp_path) is None
    assert saver.load(old) == {"step": 6} and counter.value == 5


def test_python_rng_states_survive_weights_only_loading(tmp_path):
    """A Python random.Random state is a tuple of ints: torch.load(weights_only=True) reads it back."""
    rng = random.Random(3)
    torch.save({"rng": rng.getstate()}, tmp_path / "r.pt")
    version, internal, gauss = torch.load(tmp_path / "r.pt", weights_only=True)["rng"]
    restored = random.Random()
    restored.setstate((version, tuple(internal), gauss))
    assert restored.random() == rng.random()


class Shards:
    """A directory part: writes one file per 'process' into the directory it is given."""

    def __init__(self, values, fail=False) -> None:
        self.values, self.fail, self.loaded = values, fail, None

    def save_to(self, path) -> None:
        if self.fail:
            raise OSError("no space left on device")
        path.mkdir(parents=True, exist_ok=True)
        for k, v in enumerate(self.values):
            (path / f"shard_{k}").write_text(str(v))

    def load_from(self, path) -> None:
        self.loaded = [int((path / f"shard_{k}").read_text()) for k in range(len(self.values))]


def test_directory_parts_are_written_inside_the_checkpoint_and_failures_keep_the_previous_one(tmp_path):
    counter = Counter()
    saver = Checkpointer(tmp_path, {"dcp": Shards([3, 4]), "counter.json": counter})
    first = saver.save(1)
    assert sorted(p.name for p in (first / "dcp").iterdir()) == ["shard_0", "shard_1"]
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    failing = Checkpointer(tmp_path, {"dcp": Shards([5], fail=True), "counter.json": counter})
    with pytest.raises(CheckpointSaveError, match="no space left on device"):
        failing.save(2)
    assert latest_checkpoint(tmp_path) == first and before == {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert not (tmp_path / ".tmp-step_2").exists()
    part = Shards([0, 0])
    Checkpointer(tmp_path, {"dcp": part, "counter.json": Counter()}).load(first)
    assert part.loaded == [3, 4]
    shutil.rmtree(first / "dcp")
    with pytest.raises(TrainingError, match="damaged checkpoint .*step_1: dcp/shard_0 is missing"):
        Checkpointer(tmp_path, {"dcp": Shards([0]), "counter.json": Counter()}).load(first)


def test_a_damaged_file_is_named_and_the_newest_intact_checkpoint_is_found(tmp_path):
    from transfusion_mot.common.checkpoint import latest_intact_checkpoint, verify_checkpoint

    module = torch.nn.Linear(3, 2)
    saver = Checkpointer(tmp_path, {"model.safetensors": ModuleWeights(module), "counter.json": Counter()}, keep=0)
    first, second = saver.save(1), saver.save(2)
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # cut short: a full disk
    with pytest.raises(TrainingError, match=r"damaged checkpoint .*step_2: model.safetensors has \d+ bytes but "):
        verify_checkpoint(second)
    with pytest.raises(TrainingError, match="model.safetensors has"):
        saver.load(second)
    reports = []
    assert latest_intact_checkpoint(tmp_path, reports.append) == first
    assert len(reports) == 1 and "step_2: model.safetensors" in reports[0]
    # same size, other bytes: the sha256 tells
    data = bytearray((first / "counter.json").read_bytes())
    data[-2] = ord("9") if data[-2] != ord("9") else ord("8")
    (first / "counter.json").write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="counter.json changed since it was written"):
        verify_checkpoint(first)
    assert latest_intact_checkpoint(tmp_path) is None
