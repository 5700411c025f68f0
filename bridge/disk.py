"""Disk quotas: every session's working dir and every virtual folder is a filesystem of its own.

A tenant must not fill the host's disk, nor take another tenant's inodes. The root filesystem
here is ext4 without ``prjquota``, so project quotas are not on offer; instead each quota'd dir
is a small ext4 filesystem in a *sparse* image file under ``<data dir>/disks``, loop-mounted at
the dir (``nosuid,nodev``). Its size is the byte quota (``KB_SESSION_DISK_MB``, folders
``KB_FOLDER_DISK_MB``) and ``mkfs.ext4 -N`` fixes its inode count (``KB_SESSION_INODES``): past
either, user code gets ``ENOSPC`` from its own filesystem and nobody else notices. An image costs
the host only the blocks written into it (about 0.7 MiB of metadata when empty), and never more
than its size. mkfs plus mount take some tens of milliseconds, paid by the warm pool before a
kernel is handed out (pooled dirs are made in advance) and by cold starts.

Sessions' images are journal-less (they die with the session, or at the next start); folders'
have a small journal, as they outlive the server. Destroying a session is an unmount and an
unlink, whatever it holds.

Every warm-pool kernel and every one-shot execution gets a session volume, so making one is on the
per-execution budget: a session image is a sparse copy of a template made once by mkfs (only its
~0.7 MiB of metadata is copied), and it is attached to a loop device and mounted by the server
itself (``LOOP_CONFIGURE`` with autoclear, then mount(2)), not by a ``mount -o loop`` process.
That was two processes per execution (mkfs, mount), about 8 ms of CPU; where the ioctls are not
on offer (an older kernel, no loop device node) the ``mount`` command does it as before.

Without root or loop devices there is no quota: :meth:`Volumes.probe` says why, and the server
refuses to start a sandbox that should confine tenants unless ``KB_SESSION_DISK_MB=0`` says the
operator accepts plain dirs. :func:`disk_full` turns ``ENOSPC``/``EDQUOT`` and SQLite's "database
or disk is full" into :class:`DiskFull`, which every dialect answers with 507.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Collection
from pathlib import Path

from .errors import DiskFull
from .sandbox import SandboxUnavailable
from .settings import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MNT_DETACH = 2
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOATIME = 2, 4, 8, 1024
# linux/loop.h: the ioctls and struct loop_config (fd, block_size, loop_info64, reserved[8])
LOOP_CTL_GET_FREE, LOOP_CONFIGURE, LOOP_CLR_FD = 0x4C82, 0x4C0A, 0x4C01
LO_FLAGS_AUTOCLEAR = 4  # the device lets go of the image once unmounted (as mount -o loop)
LOOP_CONFIG = struct.Struct("=II5Q4I64s64s32s2Q8Q")
LOOP_MAJOR = 7
SESSION_MOUNT = "loop,nosuid,nodev,noatime,noinit_itable"  # what the mount command is given
FOLDER_JOURNAL_MB = 4
IPC_TMPFS = "size=1m,nr_inodes=64"  # a kernel's sockets and conn.json, no more
IPC_SOURCE = "kb-ipc"
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def disk_full(exc: BaseException | None) -> DiskFull | None:
    """The DiskFull an exception means, or None: ENOSPC/EDQUOT, SQLite's SQLITE_FULL."""
    for e in (exc, getattr(exc, "__cause__", None), getattr(exc, "__context__", None)):
        if isinstance(e, DiskFull):
            return e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull("No space left on the device holding this data "
                            f"({os.strerror(e.errno)}).")
        if isinstance(e, sqlite3.Error) and (
                getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                or "database or disk is full" in str(e)):
            return DiskFull("The server's disk is full: its database cannot grow. Try again "
                            "later.")
    return None


def mounted() -> dict[str, tuple[str, str]]:
    """Mount point → (fs type, source) of this mount namespace."""
    out: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = _unescape(left.split()[4])
            fstype, source = [*right.split(), "", ""][:2]
            out[point] = (fstype, _unescape(source))
    return out


def mounted_at(path: Path | str) -> tuple[str, str] | None:
    """(fs type, source) of what is mounted at ``path`` (the last mount there), or None. Only
    the lines naming it are parsed: this runs for every disposed kernel, and mountinfo grows by
    two lines per live kernel."""
    point = os.path.realpath(path)
    needle = f" {_escape(point)} "
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if needle in line:
                left, _, right = line.partition(" - ")
                if _unescape(left.split()[4]) == point:
                    fstype, source = [*right.split(), "", ""][:2]
                    found = (fstype, _unescape(source))
    return found


def _escape(point: str) -> str:
    # As mountinfo writes a mount point: space, tab, newline and backslash as \ooo.
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in point)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field.encode("latin-1", "surrogateescape").decode("unicode_escape") \
        if "\\" in field else field


def loop_backing(source: str) -> str | None:
    """The image file behind a loop device, or None."""
    name = os.path.basename(source)
    if not name.startswith("loop"):
        return None
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
            return f.read().strip().removesuffix(" (deleted)")
    except OSError:
        return None


def umount(path: Path | str) -> None:
    """Unmount now if idle, else detach lazily (a straggler still holding it keeps its view)."""
    target = os.fsencode(str(path))
    if _libc.umount2(target, 0) == 0:
        return
    if _libc.umount2(target, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point
            raise OSError(err, os.strerror(err), str(path))


class QuotaUnavailable(SandboxUnavailable):
    def __init__(self, why: str) -> None:
        RuntimeError.__init__(
            self, f"Disk quotas are unavailable ({why}), so one tenant could fill the host's "
                  "disk.\nRun the server as root on a machine with loop devices, or start with "
                  "KB_SESSION_DISK_MB=0 to run without disk quotas (unsafe).")


class Volumes:
    """Makes and removes quota'd dirs; one per server, shared by sessions, pool and folders."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.images = Path(os.path.realpath(settings.data_dir)) / "disks"
        self.session_bytes = settings.session_disk_mb * MIB
        self.folder_bytes = settings.folder_disk_mb * MIB
        self.inodes = settings.session_inodes
        self.reserve = settings.disk_reserve_mb * MIB
        # User code runs as KB_SANDBOX_UID: it owns the root of every volume it may write.
        self.owner = settings.sandbox_uid
        self.enabled = False
        self.why_not = "not probed"
        self.cost_s = 0.0  # mkfs + mount of one session volume, measured at start
        self._template_lock = threading.Lock()  # volumes are made on worker threads
        self._loop_ioctls = True  # False once the kernel refused them: the mount command

    # -- start-up -------------------------------------------------------------------------------

    def probe(self) -> None:
        """Decide whether quotas work here by making one real session volume (and time it)."""
        if not self.session_bytes:
            self.why_not = "KB_SESSION_DISK_MB=0"
            return
        missing = [t for t in ("mkfs.ext4", "mount") if _which(t) is None]
        if os.geteuid() != 0:
            self.why_not = "not root (loop mounts need CAP_SYS_ADMIN)"
        elif missing:
            self.why_not = f"{', '.join(missing)} not found (apt-get install e2fsprogs mount)"
        elif not os.path.exists("/dev/loop-control"):
            self.why_not = "no /dev/loop-control (loop devices unavailable)"
        else:
            self.images.mkdir(mode=0o700, exist_ok=True)
            for stale in self.images.glob("probe-*"):  # a server died while probing
                if stale.is_dir():
                    self._remove(stale)
            probe = self.images / f"probe-{os.getpid()}"
            probe.mkdir(exist_ok=True)
            start = time.monotonic()
            try:
                self._make(probe, self.session_bytes, journal=False)
            except (OSError, subprocess.SubprocessError) as exc:
                self.why_not = f"a test volume failed: {exc}"
                shutil.rmtree(probe, ignore_errors=True)
                return
            self.cost_s = time.monotonic() - start
            self._remove(probe)
            self.enabled = True
            self.why_not = ""

    def require(self, sandboxed: bool) -> None:
        """A sandbox meant to confine tenants without the quota it was asked for does not
        start. Raises QuotaUnavailable."""
        if sandboxed and self.session_bytes and not self.enabled:
            raise QuotaUnavailable(self.why_not)
        if not self.enabled:
            log.warning("%s: a session can fill the data dir's disk", self.describe())

    def describe(self) -> str:
        if not self.enabled:
            return f"disk quotas OFF ({self.why_not})"
        return (f"disk quotas: a loop-mounted ext4 image per session "
                f"({self.settings.session_disk_mb} MiB, {self.inodes} inodes; "
                f"mkfs+mount {self.cost_s * 1000:.0f} ms) and per folder "
                f"({self.settings.folder_disk_mb} MiB)")

    # -- the async API --------------------------------------------------------------------------

    async def make_session_dir(self, path: Path) -> None:
        """An empty working dir at ``path``, quota'd when quotas are on. Raises DiskFull."""
        await self._make_async(path, self.session_bytes, False)

    async def make_folder_dir(self, path: Path) -> None:
        await self._make_async(path, self.folder_bytes, True)

    async def _make_async(self, path: Path, size: int, journal: bool) -> None:
        made = asyncio.ensure_future(asyncio.to_thread(self._make_checked, path, size, journal))
        try:
            await asyncio.shield(made)
        except asyncio.CancelledError:
            # The thread mounts regardless (a pool refill cancelled at shutdown): let it end,
            # then undo it, or the mount would outlive the server.
            with contextlib.suppress(Exception):
                await made
            await self.remove(path)
            raise

    async def remove(self, path: Path) -> None:
        """Unmount and delete a dir made here, with everything in it (idempotent)."""
        await asyncio.to_thread(self._remove, path)

    def check_reserve(self) -> None:
        """Raises DiskFull when the data dir's filesystem is below the reserve."""
        free = shutil.disk_usage(self.settings.data_dir).free
        if free < self.reserve:
            raise DiskFull(f"The server is low on disk ({free // MIB} MiB free, below its "
                           f"reserve of {self.reserve // MIB} MiB); try again later.")

    # -- blocking work (worker threads) ---------------------------------------------------------

    def image_of(self, path: Path) -> Path:
        return self.images / f"{path.parent.name}-{path.name}.img"

    def _make_checked(self, path: Path, size: int, journal: bool) -> None:
        self.check_reserve()
        try:
            if self.enabled and size:
                self._make(path, size, journal=journal)
            else:
                path.mkdir(mode=0o700)
        except OSError as exc:
            full = disk_full(exc)
            raise (full or exc) from exc

    def _make(self, path: Path, size: int, *, journal: bool) -> None:
        image = self.image_of(path)
        path.mkdir(mode=0o700, exist_ok=True)
        try:
            if journal:  # a folder: rare, and its journal makes it unlike a session's
                self._mkfs(image, size, journal=True)
            else:
                sparse_copy(self._template(size), image, size)
            # noinit_itable: the image is sparse, its inode tables already read as zeros.
            self._mount(image, path)
        except BaseException:
            if os.path.ismount(path):
                umount(path)
            image.unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            raise
        os.rmdir(path / "lost+found")  # users list /home/work: no mkfs leftovers
        os.chmod(path, 0o700)

    def _mkfs(self, image: Path, size: int, *, journal: bool) -> None:
        with open(image, "xb") as f:  # sparse: the host pays only for what is written
            f.truncate(size)
        features = f"-J size={FOLDER_JOURNAL_MB}" if journal else "-O ^has_journal"
        _run(["mkfs.ext4", "-F", "-q", "-N", str(self.inodes), "-m", "0", *features.split(),
              "-E", f"lazy_itable_init=1,lazy_journal_init=1,nodiscard,"
                    f"root_owner={self.owner}:{self.owner}", str(image)])

    def _template(self, size: int) -> Path:
        """The empty session filesystem every session image is copied from, made by mkfs the
        first time (its name says what is baked into it: size, inodes, owner). Kept across
        restarts; not an ``.img``: no volume's, so no sweep of leftover images takes it."""
        template = self.images / f".template-{size}-{self.inodes}-{self.owner}.ext4"
        with self._template_lock:
            if not template.exists():
                staging = template.with_name(f"{template.name}.{os.getpid()}")
                staging.unlink(missing_ok=True)
                try:
                    self._mkfs(staging, size, journal=False)
                    os.rename(staging, template)  # whole or not at all
                finally:
                    staging.unlink(missing_ok=True)
        return template

    def _mount(self, image: Path, path: Path) -> None:
        if self._loop_ioctls:
            try:
                loop_mount(image, path, MS_NOSUID | MS_NODEV | MS_NOATIME, "noinit_itable")
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.ENOENT, errno.EPERM,
                                     errno.EACCES, errno.ENXIO):
                    raise
                log.info("loop devices by ioctl unavailable (%s): volumes are mounted by the "
                         "mount command", exc)
                self._loop_ioctls = False
        _run(["mount", "-t", "ext4", "-o", SESSION_MOUNT, str(image), str(path)])

    def _remove(self, path: Path) -> None:
        image = self.image_of(path)
        if os.path.ismount(path):
            source = (mounted_at(path) or ("", ""))[1]
            if loop_backing(source) == str(image):
                umount(path)
            else:  # never touch a mount we did not make
                log.warning("%s is a mount not made by kernel-bridge; left alone", path)
                return
        image.unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    def sweep_sessions(self, directory: Path, keep: Collection[Path] = ()) -> None:
        """At start: remove every session dir a previous server left but those of the
        sessions it re-adopted (``keep``), our mounts first."""
        if directory.is_dir():
            for child in directory.iterdir():
                if child not in keep:
                    self._remove(child)
        if self.images.is_dir():  # images whose mount point is gone
            live = {loop_backing(src) for _, src in mounted().values()}
            for image in self.images.glob(f"{directory.name}-*.img"):
                if str(image) not in live:
                    image.unlink(missing_ok=True)

    def mount_folders(self, directory: Path) -> None:
        """At start: mount each folder's image at its dir (kept if still mounted); a folder
        made without a quota (an older release, or KB_FOLDER_DISK_MB=0) gets one now."""
        if self.enabled and self.folder_bytes and directory.is_dir():
            for path in sorted(directory.iterdir()):
                if (path.is_dir() and not path.name.startswith(".")
                        and not self.image_of(path).exists()):
                    self._adopt(path)
        if not self.images.is_dir():
            return
        points = mounted()
        live = {loop_backing(src) for _, src in points.values()}
        for image in sorted(self.images.glob(f"{directory.name}-*.img")):
            if str(image) in live:
                continue
            path = directory / image.name.removeprefix(f"{directory.name}-").removesuffix(".img")
            if path.name.startswith(".") or not path.is_dir():
                image.unlink(missing_ok=True)  # its folder was deleted while we were down
                continue
            try:
                _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(image),
                      str(path)])
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("cannot mount folder image %s: %s", image, exc)

    def _adopt(self, path: Path) -> None:
        """Move a plain folder dir into an image of its own, or leave it (logged) if it does
        not fit."""
        staging = path.parent / f".adopt-{path.name}"
        try:
            self._make(staging, self.folder_bytes, journal=True)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("folder %s stays without a quota: %s", path.name, exc)
            return
        try:
            _run(["cp", "-a", "--", f"{path}/.", str(staging)])
            os.chmod(staging, stat.S_IMODE(os.stat(path).st_mode))
        except OSError as exc:
            log.error("folder %s stays without a quota (its files do not fit): %s",
                      path.name, exc)
            self._remove(staging)
            return
        umount(staging)
        os.rmdir(staging)
        os.rename(self.image_of(staging), self.image_of(path))
        old = path.parent / f".old-{path.name}"
        os.rename(path, old)
        path.mkdir(mode=0o755)
        _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(self.image_of(path)),
              str(path)])
        shutil.rmtree(old, ignore_errors=True)
        log.info("folder %s now has a quota of %d MiB", path.name, self.folder_bytes // MIB)

    def unmount_folders(self, directory: Path) -> None:
        """At stop: unmount every folder image of ours (they are mounted again at start)."""
        real = Path(os.path.realpath(directory))
        for point, (_, source) in mounted().items():
            if Path(point).parent == real and loop_backing(source) == str(
                    self.image_of(Path(point))):
                try:
                    umount(point)
                except OSError as exc:
                    log.warning("cannot unmount %s: %s", point, exc)


def sparse_copy(source: Path, target: Path, size: int) -> None:
    """A new file ``target`` of ``size`` bytes holding ``source``'s data extents, its holes left
    holes (a 1 GiB empty filesystem image is ~0.7 MiB of data)."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        dst.truncate(size)
        fd_in, fd_out, offset = src.fileno(), dst.fileno(), 0
        while True:
            try:
                start = os.lseek(fd_in, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past offset
                    return
                raise
            end = os.lseek(fd_in, start, os.SEEK_HOLE)
            while start < end:
                copied = os.copy_file_range(fd_in, fd_out, end - start, start, start)
                if copied == 0:
                    raise OSError(errno.EIO, f"short copy of {source}")
                start += copied
            offset = end


def loop_mount(image: Path, path: Path, flags: int, options: str) -> None:
    """What ``mount -o loop`` does, without its process: attach ``image`` to a free loop device
    (autoclear: the device lets go of it at the unmount) and mount that ext4 at ``path``.
    Raises OSError (nothing left attached)."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(16):  # another process may take the free device first (EBUSY)
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                device = f"/dev/loop{number}"
                if not os.path.exists(device):  # a device the kernel just made, no node yet
                    os.mknod(device, 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, number))
                fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                try:
                    name = os.fsencode(str(image))[:63]
                    config = LOOP_CONFIG.pack(backing, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                              LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0,
                                              *([0] * 8))
                    try:
                        fcntl.ioctl(fd, LOOP_CONFIGURE, config)
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:
                            continue
                        raise
                    if _libc.mount(os.fsencode(device), os.fsencode(str(path)), b"ext4", flags,
                                   options.encode()) != 0:
                        err = ctypes.get_errno()
                        with contextlib.suppress(OSError):
                            fcntl.ioctl(fd, LOOP_CLR_FD)
                        raise OSError(err, os.strerror(err), str(path))
                    return
                finally:
                    os.close(fd)
            raise OSError(errno.EBUSY, "no free loop device", str(image))
        finally:
            os.close(backing)
    finally:
        os.close(ctl)


def _which(tool: str) -> str | None:
    # mkfs lives in /sbin, which a service's PATH may lack.
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin",
                                                    "/sbin"]))


def _run(argv: list[str]) -> None:
    argv = [_which(argv[0]) or argv[0], *argv[1:]]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})
    except subprocess.TimeoutExpired:
        raise OSError(errno.ETIMEDOUT, f"{argv[0]} took over 60 s") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        if "No space left" in msg:
            raise OSError(errno.ENOSPC, msg)
        raise OSError(errno.EIO, f"{argv[0]} failed: {msg}")


# -- kernels' IPC dirs ----------------------------------------------------------------------------

def mount_ipc(path: Path) -> None:
    """A tiny tmpfs over a kernel's socket dir, with the dir's owner and mode: the kernel may
    write there (it binds its sockets), so without one it could fill the host's /tmp.
    Only as root; else a no-op."""
    if os.geteuid() != 0:
        return
    st = os.stat(path)
    data = (f"{IPC_TMPFS},mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}"
            ).encode()
    # Not the server's pid: the kernel outlives the server (kernels.sweep_ipc decides what goes).
    source = f"{IPC_SOURCE}-kernel".encode()
    if _libc.mount(source, os.fsencode(str(path)), b"tmpfs",
                   MS_NOSUID | MS_NODEV | MS_NOEXEC, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))


def unmount_ipc(path: Path) -> None:
    if os.path.ismount(path) and (mounted_at(path) or ("", ""))[1].startswith(IPC_SOURCE):
        umount(path)
