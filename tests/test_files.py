"""atomic_path: the final name appears only when the write finished; user_cache_dir: where kept files go."""

from pathlib import Path

import pytest

from tadisr_core.files import atomic_path, user_cache_dir


def test_success_renames_onto_the_final_name(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # readers still see the previous file meanwhile
    assert target.read_bytes() == b"new" and not tmp.exists()


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_the_cache_folder_is_the_variable_s_else_the_home_s(tmp_path, monkeypatch):
    """XDG_CACHE_HOME is not followed: LPIPS weights kept in ~/.cache/tadisr by earlier versions (fetched online)
    would be lost to an offline machine that sets it."""
    monkeypatch.delenv("TADISR_SOME_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("some", "TADISR_SOME_DIR") == tmp_path / "home" / ".cache" / "tadisr" / "some"
    monkeypatch.setenv("TADISR_SOME_DIR", "~/mine")
    assert user_cache_dir("some", "TADISR_SOME_DIR") == Path(tmp_path / "home" / "mine")
