"""A folder as an uncompressed tar, streamed: headers and file chunks as they are read, never the
whole archive in memory; its exact size is known up front (for Content-Length)."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1024 * 1024
_BLOCK = tarfile.BLOCKSIZE  # 512
_END = b"\0" * (2 * _BLOCK)  # two zero blocks end an archive


@dataclass(frozen=True)
class _Member:
    header: bytes
    path: Path | None  # None: a directory
    size: int


def _header(name: str, *, size: int, directory: bool, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.mtime = int(mtime)
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


class FolderTar:
    """The files under `folder` as members `root/<relative path>` (sorted; links skipped)."""

    def __init__(self, folder: Path, root: str):
        now = time.time()
        self._members = [_Member(_header(root, size=0, directory=True, mtime=now), None, 0)]
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            name = f"{root}/{path.relative_to(folder).as_posix()}"
            size = path.stat().st_size if path.is_file() else 0
            header = _header(name, size=size, directory=path.is_dir(), mtime=now)
            self._members.append(_Member(header, path if path.is_file() else None, size))

    @property
    def size(self) -> int:
        return sum(len(m.header) + _padded(m.size) for m in self._members) + len(_END)

    def __iter__(self) -> Iterator[bytes]:
        for member in self._members:
            yield member.header
            if member.path is None:
                continue
            sent = 0
            with member.path.open("rb") as handle:
                while chunk := handle.read(min(CHUNK, member.size - sent)):
                    sent += len(chunk)
                    yield chunk
            if sent != member.size:
                raise RuntimeError(f"{member.path} changed size while it was sent")
            if _padded(sent) > sent:
                yield b"\0" * (_padded(sent) - sent)
        yield _END


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK
