"""Outputs written atomically (temporary file or folder, then rename) get the mode any new file gets:
0o666 (folders 0o777) minus the umask, not tempfile's owner-only 0o600 / 0o700."""

from __future__ import annotations

import os
import stat

import pytest

from llmlab.common import atomic_path, write_text_atomic
from llmlab.formats.convert import convert


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_get_the_umask_mode(tmp_path, umask):
    write_text_atomic(tmp_path / "a.json", "{}\n")
    with atomic_path(tmp_path / "b.bin") as tmp, open(tmp, "wb") as f:
        f.write(b"\0")
    for name in ("a.json", "b.bin"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]  # no temporary left behind


def test_convert_output_folder_and_files_get_the_umask_mode(tmp_path, umask):
    out = tmp_path / "hf"
    convert("llama-tiny", out)
    assert _mode(out) == 0o777 & ~umask
    files = sorted(out.iterdir())
    assert {"config.json", "model.safetensors", "llmlab.json"} <= {p.name for p in files}
    for p in files:
        assert _mode(p) == 0o666 & ~umask, p.name
