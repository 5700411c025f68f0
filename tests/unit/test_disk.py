"""Units of bridge/disk.py on this machine: a real volume's limits, and the decision to refuse
a sandboxed start when quotas cannot be had."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from bridge import disk
from bridge.disk import QuotaUnavailable, Volumes
from bridge.errors import DiskFull
from bridge.sandbox import SandboxUnavailable
from bridge.settings import Settings

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts need root")


def volumes(tmp_path: Path, **kw: object) -> Volumes:
    settings = Settings(data_dir=tmp_path / "data", **kw)  # type: ignore[arg-type]
    settings.sessions_dir.mkdir(parents=True)
    return Volumes(settings)


@root_only
def test_a_session_volume_is_its_own_small_filesystem(tmp_path: Path) -> None:
    v = volumes(tmp_path, session_disk_mb=32, session_inodes=2048)
    v.probe()
    assert v.enabled, v.why_not
    path = v.settings.sessions_dir / "s1"
    asyncio.run(v.make_session_dir(path))
    try:
        assert os.path.ismount(path) and os.listdir(path) == []  # no lost+found
        st = os.statvfs(path)
        assert st.f_blocks * st.f_frsize <= 32 * 1024 * 1024
        assert 2048 <= st.f_files < 2200
        with pytest.raises(OSError) as info, open(path / "big", "wb") as f:
            for _ in range(64):
                f.write(bytes(1024 * 1024))
                f.flush()
                os.fsync(f.fileno())
        assert info.value.errno == errno.ENOSPC
        assert isinstance(disk.disk_full(info.value), DiskFull)
    finally:
        asyncio.run(v.remove(path))
    assert not path.exists() and not v.image_of(path).exists()


def _attached(image: Path) -> list[str]:
    """The loop devices whose backing file is ``image``."""
    return [dev.name for dev in Path("/sys/block").glob("loop*")
            if disk.loop_backing(f"/dev/{dev.name}") == str(image)]


@root_only
def test_session_volumes_are_sparse_copies_of_one_template_mounted_apart(tmp_path: Path) -> None:
    v = volumes(tmp_path, session_disk_mb=64, session_inodes=4096)
    v.probe()
    assert v.enabled, v.why_not
    a, b = (v.settings.sessions_dir / name for name in ("a", "b"))
    asyncio.run(v.make_session_dir(a))
    asyncio.run(v.make_session_dir(b))
    try:
        assert os.path.ismount(a) and os.path.ismount(b)
        assert os.stat(a).st_dev != os.stat(b).st_dev  # two filesystems, not one
        (a / "mine").write_text("a's")
        assert os.listdir(b) == []
        for path in (a, b):
            image = v.image_of(path)
            assert image.stat().st_size == 64 * 1024 * 1024  # the quota
            assert image.stat().st_blocks * 512 < 4 * 1024 * 1024  # holes stayed holes
            assert len(_attached(image)) == 1
            assert 4096 <= os.statvfs(path).f_files < 4400  # the template's inode count
    finally:
        asyncio.run(v.remove(a))
        asyncio.run(v.remove(b))
    for path in (a, b):  # unmounted, image gone, no loop device left holding it
        assert not path.exists() and not v.image_of(path).exists()
        assert _attached(v.image_of(path)) == []


@root_only
def test_without_loop_ioctls_the_mount_command_mounts(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object) -> None:
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    monkeypatch.setattr(disk, "loop_mount", refused)
    v = volumes(tmp_path, session_disk_mb=32, session_inodes=2048)
    v.probe()
    assert v.enabled, v.why_not
    path = v.settings.sessions_dir / "s"
    asyncio.run(v.make_session_dir(path))
    try:
        assert os.path.ismount(path) and len(_attached(v.image_of(path))) == 1
    finally:
        asyncio.run(v.remove(path))
    assert not path.exists() and _attached(v.image_of(path)) == []


def test_without_loop_mounts_a_sandbox_refuses_unless_told(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(disk, "_which", lambda tool: None)
    v = volumes(tmp_path)
    v.probe()
    assert not v.enabled and ("not found" in v.why_not or "not root" in v.why_not)
    with pytest.raises(QuotaUnavailable, match="KB_SESSION_DISK_MB=0") as info:
        v.require(sandboxed=True)
    assert isinstance(info.value, SandboxUnavailable)  # the CLI's exit 2 with the message
    v.require(sandboxed=False)  # unconfined anyway: a warning, not a refusal
    off = volumes(tmp_path / "off", session_disk_mb=0)
    off.probe()
    off.require(sandboxed=True)  # the operator said so
    path = off.settings.sessions_dir / "plain"
    asyncio.run(off.make_session_dir(path))
    assert path.is_dir() and not os.path.ismount(path)
    asyncio.run(off.remove(path))
    assert not path.exists()


def test_low_reserve_refuses_new_dirs(tmp_path: Path) -> None:
    v = volumes(tmp_path, disk_reserve_mb=10**9)  # more than any disk here has free
    with pytest.raises(DiskFull, match="low on disk"):
        asyncio.run(v.make_session_dir(v.settings.sessions_dir / "s"))
