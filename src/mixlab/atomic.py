"""Atomic outputs: the one scheme behind every folder mixlab writes (saved and converted
checkpoints, training checkpoints, prepared datasets) and its single files (GGUF).

The guarantees:
- **All or nothing.** New content goes to a temporary sibling `.NAME.tmp-PID-XXXXXXXX`, is
  fsynced, and replaces `NAME` in one step: on Linux `renameat2(RENAME_EXCHANGE)` swaps the two
  folders atomically, so `NAME` never stops existing, and the old content (now in the temporary)
  is deleted. Without it, two renames through `.NAME.new` (the commit point) and `.NAME.old`;
  `recover(NAME)` finishes them after a crash. Files are replaced with `os.replace`.
- **mixlab replaces only what it wrote.** Each folder gets a manifest (`MANIFEST`) of its files and
  their sizes (and SHA-256 when asked). A destination that exists and holds anything not in its
  manifest, or that mixlab wrote as another kind of folder (a dataset where a checkpoint goes), is
  refused unless `overwrite=True` (`--overwrite`); a destination that is or contains a
  source, or a file read with it (`inputs`: a split GGUF's other parts, where a source folder's links
  point), is refused always (nothing that holds the input is ever deleted). A file destination is
  replaced only if it starts with the expected magic bytes.
- **Symlinks are written through:** a destination that is a link (or lies under one) is resolved;
  the folder it points to is replaced and the link stays.
- **Leftovers are cleaned by name:** a temporary `.NAME.tmp-PID-*` whose process is gone is deleted
  by the next write of `NAME`; nothing else is touched.
- **Usual modes:** folders are made with `os.mkdir` (0777 & ~umask), not mkdtemp's 0700.
- **Writable first:** a destination whose folder this process may not write (its mode, a read-only
  file system) is refused by `check_destination`, before the work.
One writer per destination at a time. Small single files (settings JSON, reports, figures) go
through `atomic_file` / `write_text`; the one exception is an append-only log (`metrics.jsonl`),
whose torn last line a reader drops.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mixlab.errors import CheckpointError, OutputError

MANIFEST = ".mixlab-manifest.json"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    try:
        f = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_EXCHANGE = _renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside `path` durable (fsync of the folder itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling(dst: Path, tag: str) -> Path:
    dst = Path(os.path.abspath(dst))  # "." and "ckpt/.." have no usable name until made absolute
    return dst.with_name(f".{dst.name}.{tag}")


def recover(dst: Path) -> None:
    """Finish or undo a two-rename replacement of `dst` that a crash interrupted (the fallback where
    RENAME_EXCHANGE is unavailable): `.NAME.new` complete means committed."""
    dst = Path(os.path.abspath(dst))
    new, old = sibling(dst, "new"), sibling(dst, "old")
    if new.is_dir():  # committed: the new copy is complete, finish the swap
        if dst.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(dst, old)
        os.rename(new, dst)
        fsync_dir(dst.parent)
    elif old.is_dir() and not dst.exists():  # not produced by the protocol, but never lose a copy
        os.rename(old, dst)
    if old.exists() and dst.exists():
        shutil.rmtree(old)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_leftovers(real: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID[-*]` siblings of `real` left by processes that are gone; returns them."""
    prefix = f".{real.name}.tmp-"
    gone: list[Path] = []
    if not real.parent.is_dir():
        return gone
    for p in real.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name.removeprefix(prefix).split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            _remove(p)
            gone.append(p)
    return gone


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a folder mixlab wrote, or None (absent or unreadable)."""
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        return None
    return m


def _entries(folder: Path) -> list[str]:
    """Every non-folder entry under `folder` (links not followed), and every empty subfolder, relative."""
    out = []
    for root, dirs, files in os.walk(folder):
        r = Path(root)
        for d in list(dirs):
            if (r / d).is_symlink():
                dirs.remove(d)
                files.append(d)
        out += [(r / f).relative_to(folder).as_posix() for f in files]
        if r != folder and not dirs and not files:
            out.append(r.relative_to(folder).as_posix() + "/")
    return sorted(out)


def foreign_entries(folder: Path) -> list[str]:
    """What `folder` holds that mixlab's manifest there does not list (all of it without a manifest)."""
    m = read_manifest(folder)
    ours = set(m["files"]) | {MANIFEST} if m else set()
    return [e for e in _entries(folder) if e not in ours]


def _names(xs: Sequence[str]) -> str:
    return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")


def check_writable(folder: Path, shown: str) -> None:
    """OutputError unless this process may add entries to `folder` (where the temporary goes, or a
    report's files): refused before the work, naming the destination (else the write failed after
    it, naming the temporary)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write into {folder} (no write permission, or a read-only file "
                          "system); choose another destination")
    probe = folder / f".mixlab-probe-{os.getpid()}-{secrets.token_hex(4)}"  # root passes os.access on /proc, say
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise OutputError(f"{shown}: cannot write into {folder} ({e.strerror}); choose another destination") from None
    os.unlink(probe)


def check_destination(
    dst: str | Path, *, sources: Sequence[str | Path] = (), overwrite: bool = False, kind: str = "folder",
    magic: bytes | None = None, inputs: Mapping[Path, str] | None = None, writes: str | None = None,
) -> Path:
    """The real path to write `dst` to, after the checks of the module docstring; OutputError if refused.

    `kind`: "folder" or "file". `magic`: for files, the leading bytes that mark one mixlab may replace.
    `writes`: for folders, the manifest's kind of what is written ("checkpoint", "dataset", ...): a folder
    mixlab wrote as another kind is replaced only with `overwrite`.
    `inputs`: more files the command reads, outside its sources (a split GGUF's other parts, the
    targets of a source folder's links), each with what it is: `dst` may neither be nor hold one.
    """
    if kind == "file" and str(dst).endswith(("/", os.sep)):  # Path() drops the slash: `--json out/` wrote a file "out"
        raise OutputError(f"{dst}: names a folder (it ends in {str(dst)[-1]}); give a file name")
    given = Path(dst)
    real = Path(os.path.realpath(given))
    shown = f"{given} (a link to {real})" if real != Path(os.path.abspath(given)) else str(given)
    inside: Path | None = None
    for s, name in [*((s, f"the source {s}") for s in sources), *(inputs or {}).items()]:
        src = Path(os.path.realpath(s))
        if _contains(real, src):
            what = "is" if src == real else "contains"
            raise OutputError(f"{shown}: refusing to write there: it {what} {name}; choose another destination")
        if _contains(src, real):
            inside = Path(s)
    if inside is not None:  # part of a source: --overwrite never deletes it (only what mixlab wrote)
        overwrite = False
    hint = (f"it lies inside the source {inside}; choose another destination" if inside is not None else
            "pass --overwrite (overwrite=True) to replace it, or choose another destination")
    if not os.path.lexists(real):
        if os.path.exists(given) and not given.is_dir():  # /dev/stdout: a link to a pipe with no real path
            raise OutputError(f"{shown}: is not a regular file (a pipe or a device): the write goes through a "
                              "temporary file renamed into place; choose a file")
        # the missing folders above are made by the write; a file there failed it with 'File exists'
        above = next(p for p in real.parents if os.path.lexists(p))
        if not above.is_dir():
            raise OutputError(f"{shown}: {above} is a file, not a folder; choose another destination")
        check_writable(above, shown)
        return real
    check_writable(real.parent, shown)  # the temporary sibling, and the rename over `dst`
    if kind == "folder":
        if not real.is_dir():
            raise OutputError(f"{shown}: exists and is not a folder; remove it or choose another destination")
        foreign = foreign_entries(real)
        if foreign and not overwrite:
            raise OutputError(f"{shown}: holds files mixlab did not write ({_names(foreign)}); {hint}")
        held = (read_manifest(real) or {}).get("kind", writes)
        if writes is not None and held != writes and not overwrite:  # a dataset where a model goes: a typo
            raise OutputError(f"{shown}: holds a {str(held).replace('-', ' ')} mixlab wrote, not a "
                              f"{writes.replace('-', ' ')}; {hint}")
        return real
    if real.is_dir():
        example = f" (for example {given / 'model.gguf'})" if magic == b"GGUF" else ""
        raise OutputError(f"{shown}: is a folder; give a file name{example}")
    if not real.is_file():
        raise OutputError(f"{shown}: exists and is not a regular file")
    if not overwrite and (magic is not None or inside is not None):
        with open(real, "rb") as f:
            head = f.read(len(magic or b""))
        if magic is None or head != magic:
            why = f" (it does not start with {magic!r})" if magic else ""
            raise OutputError(f"{shown}: exists and may not be mixlab's{why}; {hint}")
    return real


def check_json_destination(dst: str | Path, **kw: Any) -> Path:
    """`check_destination` of a JSON result's file (`eval --json`, `bench --out`), which replaces an existing
    file only if it is empty or holds JSON (`bench --out MODEL/model.safetensors` replaced a model's weights)."""
    real = check_destination(dst, kind="file", **kw)
    if real.is_file():
        with open(real, "rb") as f:
            head = f.read(64).lstrip()[:1]
        if head and head not in (b"{", b"["):
            raise OutputError(f"{dst}: exists and is not a JSON file (only one of those is replaced); remove it or "
                              "choose another destination")
    return real


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, *, kind: str, checksums: bool = False) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    for e in _entries(folder):
        if e == MANIFEST or e.endswith("/"):
            continue
        entry: dict[str, Any] = {"bytes": (folder / e).stat().st_size}
        if checksums:
            entry["sha256"] = sha256(folder / e)
        files[e] = entry
    m = {"written_by": "mixlab", "kind": kind, "files": files}
    (folder / MANIFEST).write_text(json.dumps(m, indent=1) + "\n", encoding="utf-8")
    return m


def verify(folder: Path) -> dict[str, Any]:
    """Check a folder against its manifest (presence, sizes, SHA-256 where recorded); CheckpointError
    naming the first file that differs. Returns the manifest."""
    m = read_manifest(folder)
    if m is None:
        raise CheckpointError(f"{folder}: no readable {MANIFEST} (not written by mixlab, or damaged)")
    for name, entry in m["files"].items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if f.stat().st_size != entry.get("bytes"):
            raise CheckpointError(f"{f}: has {f.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
        if "sha256" in entry and sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: content differs from what was written (SHA-256 mismatch); the file is "
                                  "damaged")
    return m


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (before renaming it, or files from it, into place)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def _commit_folder(tmp: Path, real: Path) -> None:
    if not os.path.lexists(real):
        os.rename(tmp, real)
    elif _exchange(tmp, real):
        shutil.rmtree(tmp)  # the old content
    else:  # two renames; `recover` finishes them after a crash
        os.rename(tmp, sibling(real, "new"))
        fsync_dir(real.parent)
        recover(real)
        return
    fsync_dir(real.parent)


def _naming(e: BaseException, dst: str | Path) -> BaseException:
    """`e`, or for an OSError that names no file (a full disk: ENOSPC, EDQUOT) one naming `dst`."""
    if isinstance(e, OSError) and e.filename is None:
        return OSError(e.errno, e.strerror or str(e), str(dst))
    return e


def new_temporary(real: Path) -> Path:
    """A fresh, empty temporary folder next to `real` with the usual mode, named for cleanup."""
    while True:
        tmp = real.with_name(f".{real.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_folder(
    dst: str | Path, *, sources: Sequence[str | Path] = (), overwrite: bool = False, kind: str = "mixlab",
    checksums: bool = False, inputs: Mapping[Path, str] | None = None,
) -> Iterator[Path]:
    """Write a folder atomically: yields an empty temporary folder to fill; on success it gets a
    manifest and replaces `dst`; on any error it is deleted and `dst` is untouched. `sources`,
    `inputs`, `overwrite`: as `check_destination`."""
    real = Path(os.path.realpath(dst))
    real.parent.mkdir(parents=True, exist_ok=True)
    recover(real)
    remove_leftovers(real)
    real = check_destination(dst, sources=sources, overwrite=overwrite, kind="folder", writes=kind, inputs=inputs)
    tmp = new_temporary(real)
    try:
        yield tmp
        write_manifest(tmp, kind=kind, checksums=checksums)
        sync_tree(tmp)
        _commit_folder(tmp, real)
    except BaseException as e:
        _remove(tmp)
        if (named := _naming(e, dst)) is not e:
            raise named from e
        raise


@contextlib.contextmanager
def atomic_file(
    dst: str | Path, *, sources: Sequence[str | Path] = (), overwrite: bool = False, magic: bytes | None = None,
) -> Iterator[Path]:
    """Write one file atomically: yields a temporary path next to `dst` to write; on success it is
    fsynced and renamed over `dst`; on any error it is deleted."""
    real = Path(os.path.realpath(dst))
    real.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(real)
    real = check_destination(dst, sources=sources, overwrite=overwrite, kind="file", magic=magic)
    tmp = real.with_name(f".{real.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, real)
        fsync_dir(real.parent)
    except BaseException as e:
        _remove(tmp)
        if (named := _naming(e, dst)) is not e:
            raise named from e
        raise


@contextlib.contextmanager
def exclusive(folder: Path, *, what: str) -> Iterator[None]:
    """Hold `folder` (made if missing) for this process alone while the block runs: a second process
    asking for it meanwhile gets an OutputError (a `flock` on the folder itself, which the system
    drops when the holder ends, even killed). A folder made here and left empty is removed."""
    made = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            made = False
            raise OutputError(f"{folder}: another process is writing this {what} now; wait for it to end, or "
                              "choose another --out") from None
        except OSError:  # a file system without locks (some FUSE mounts): unguarded, as before
            pass
        yield
    finally:
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def write_text(dst: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Write a small text file (a settings JSON, a report) atomically: readers see the old content or
    the new, never a half-written file. An existing regular file there is replaced."""
    with atomic_file(dst) as tmp:
        tmp.write_text(text, encoding=encoding)


__all__ = ["MANIFEST", "atomic_file", "atomic_folder", "check_destination", "exclusive", "foreign_entries",
           "read_manifest", "recover", "remove_leftovers", "verify", "write_text"]
