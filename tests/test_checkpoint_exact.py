"""Atomic checkpoints, exactly: what a checkpoint folder holds (the manifest's sizes and SHA-256 equal
hashlib's), keep-N pruning, stale temporary folders, each corruption ``verify`` names, ``latest`` falling
back to the previous good one, a failed write leaving nothing, weights-only training state."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.formats import checkpoint as ckpt
from llmlab.models import build_model, get_preset


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = get_preset("llama-tiny")
    return cfg, build_model(cfg).state_dict()


def _save(root, step, tiny, **kw):
    cfg, sd = tiny
    return ckpt.save(root, step, cfg, sd, **kw)


def test_a_checkpoint_holds_the_model_state_and_a_manifest_that_matches_hashlib(tmp_path, tiny):
    cfg, sd = tiny
    extra = {"head.safetensors": {"w": torch.arange(6.0).reshape(2, 3)}}
    state = {"step": 3, "rng": torch.arange(4), "lr": 0.5}
    folder = _save(tmp_path, 3, tiny, extra_tensors=extra, training_state=state, trainer_state={"loss": 1.5},
                   tokenizer=(json.dumps({"version": "1.0"}), {"model_max_length": 8}))
    assert folder == tmp_path / "step-00000003"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 3
    names = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == names
    assert {"config.json", "model.safetensors", "head.safetensors", "training_state.pt", "trainer_state.json",
            "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name, info in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((folder / "trainer_state.json").read_text()) == {"step": 3, "loss": 1.5}
    assert ckpt.verify(folder) is None
    got_cfg, got_sd = ckpt.load_model_state(folder)
    assert got_cfg.dim == cfg.dim and set(got_sd) == set(sd) - {"lm_head.weight"}  # tied to the embedding
    assert all(torch.equal(got_sd[k], sd[k]) for k in got_sd)
    back = ckpt.load_training_state(folder)
    assert back["step"] == 3 and back["lr"] == 0.5 and torch.equal(back["rng"], state["rng"])
    # without the optional parts: no training state, trainer state is just the step
    bare = _save(tmp_path / "bare", 0, tiny)
    assert not (bare / "training_state.pt").exists() and not (bare / "tokenizer.json").exists()
    assert json.loads((bare / "trainer_state.json").read_text()) == {"step": 0}


def test_sha256_of_a_file_larger_than_one_read_block(tmp_path):
    path = tmp_path / "big"
    data = os.urandom((1 << 20) + 12345)
    path.write_bytes(data)
    assert ckpt._sha256(path) == hashlib.sha256(data).hexdigest()


def test_keep_prunes_the_oldest_and_stale_temporaries_are_removed(tmp_path, tiny):
    (tmp_path / ".tmp-step-00000001-999").mkdir(parents=True)
    (tmp_path / "step-notanumber").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "step-00000077").write_text("a file, not a checkpoint")
    for step in (5, 20, 10):
        _save(tmp_path, step, tiny, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000020", "step-00000010"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert (tmp_path / "step-notanumber").is_dir() and (tmp_path / "other").is_dir()
    _save(tmp_path, 30, tiny, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000030"]
    # saving a step again replaces it
    again = _save(tmp_path, 30, tiny, keep=3, trainer_state={"again": True})
    assert json.loads((again / "trainer_state.json").read_text())["again"] is True
    assert ckpt.list_checkpoints(tmp_path / "missing") == []


def test_numeric_order_not_name_order(tmp_path):
    for name in ("step-9", "step-10", "step-00000002"):
        (tmp_path / name).mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-10", "step-9", "step-00000002"]


def test_verify_names_each_problem_and_latest_falls_back(tmp_path, tiny):
    older = _save(tmp_path, 1, tiny, keep=5, training_state={"a": 1})
    newest = _save(tmp_path, 2, tiny, keep=5, training_state={"a": 2})
    assert ckpt.latest(tmp_path) == (newest, [])
    weights = newest / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert ckpt.verify(newest) == "model.safetensors does not match its SHA-256 (corrupted)"
    weights.write_bytes(original[:100])
    assert ckpt.verify(newest) == (f"model.safetensors has 100 bytes, the manifest says {len(original)} "
                                   "(truncated)")
    found, skipped = ckpt.latest(tmp_path)
    assert found == older and skipped == [f"skipping checkpoint {newest}: " + ckpt.verify(newest)]
    weights.unlink()
    assert ckpt.verify(newest) == "model.safetensors is missing"
    for manifest in ("", "{", '{"nofiles": 1}', "[1]", '{"files": 3}', '{"files": {"config.json": 3}}'):
        (older / "manifest.json").write_text(manifest)
        assert ckpt.verify(older) == "no readable manifest.json (incomplete write)", manifest
    (older / "manifest.json").unlink()
    assert ckpt.verify(older) == "no readable manifest.json (incomplete write)"
    found, skipped = ckpt.latest(tmp_path)
    assert found is None and len(skipped) == 2
    assert ckpt.latest(tmp_path / "none") == (None, [])


def test_a_failed_write_leaves_nothing_and_the_previous_checkpoint_intact(tmp_path, tiny, monkeypatch):
    good = _save(tmp_path, 1, tiny)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "_sha256", full_disk)
        with pytest.raises(LlmlabError) as err:
            _save(tmp_path, 2, tiny)
    assert str(err.value) == (f"could not write checkpoint {tmp_path / 'step-00000002'} (No space left on device); "
                              "nothing was written and the previous checkpoints are intact: free disk space and "
                              "resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert ckpt.verify(good) is None

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_sha256", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


class _Evil:
    """Unpickling this makes a folder: the side effect shows whether code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_training_state_is_loaded_weights_only(tmp_path):
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    torch.save({"state": _Evil(tmp_path / "pwned")}, folder / "training_state.pt")
    with pytest.raises(LlmlabError, match=r"training_state.pt: cannot load training state \(UnpicklingError\)"):
        ckpt.load_training_state(folder)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(LlmlabError, match=r"cannot load training state \(FileNotFoundError\)"):
        ckpt.load_training_state(tmp_path)  # no file at all


def test_fsync_dir_tolerates_a_missing_folder(tmp_path):
    ckpt._fsync_dir(tmp_path / "missing")
    ckpt._fsync_dir(tmp_path)


def test_failing_to_even_create_the_temporary_folder_is_the_same_clean_error(tmp_path, tiny, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name.startswith(".tmp-"):
            raise error
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    error = OSError(28, "No space left on device")
    with pytest.raises(LlmlabError, match="No space left on device"):
        _save(tmp_path, 1, tiny)
    error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 1, tiny)
    assert list(tmp_path.iterdir()) == []


def test_root_folders_are_created_and_a_leftover_temporary_of_this_process_is_replaced(tmp_path, tiny):
    root = tmp_path / "a" / "b"
    leftover = root / f".tmp-step-00000004-{os.getpid()}"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("from a crashed attempt")
    folder = _save(root, 4, tiny)
    assert ckpt.verify(folder) is None and not (folder / "junk").exists()
    deeper = _save(tmp_path / "c" / "d", 1, tiny)
    assert ckpt.verify(deeper) is None


def test_two_checkpoints_are_kept_by_default(tmp_path, tiny):
    for step in (1, 2, 3):
        _save(tmp_path, step, tiny)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000002"]


def test_a_skipped_checkpoint_is_logged_with_its_reason(tmp_path, tiny, caplog):
    good = _save(tmp_path, 1, tiny, keep=5)
    bad = _save(tmp_path, 2, tiny, keep=5)
    (bad / "config.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest(tmp_path)[0] == good
    assert f"skipping checkpoint {bad}: config.json is missing" in caplog.text
