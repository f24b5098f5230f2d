"""What `detox versions export` receives, put on disk safely: a tar with one top folder unpacked
into a folder of the user's choosing, and a safetensors file's metadata read (no torch)."""

from __future__ import annotations

import json
import shutil
import struct
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

from app.cli.client import ClientError

CHUNK = 1024 * 1024
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class MalformedExport(ClientError):
    """The server sent something that is not the archive or file an export is."""


def unpack_tar(archive: IO[bytes], out: Path) -> list[Path]:
    """Unpack the archive's one top folder's contents into `out`; only plain files and folders,
    none outside `out`. Returns the files written."""
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            members = tar.getmembers()
            if len({m.name.split("/", 1)[0] for m in members}) != 1:
                raise MalformedExport("the export archive does not hold exactly one top folder")
            written = []
            for member in members:
                relative = PurePosixPath(member.name.partition("/")[2])
                if not relative.parts:
                    continue  # the top folder itself
                if relative.is_absolute() or ".." in relative.parts:
                    raise MalformedExport(f"the export archive holds the unsafe {member.name!r}")
                target = out.joinpath(*relative.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                source = tar.extractfile(member) if member.isfile() else None
                if source is None:
                    raise MalformedExport(f"the export archive holds a non-file {member.name!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with source, target.open("wb") as handle:
                    shutil.copyfileobj(source, handle, CHUNK)
                written.append(target)
    except (tarfile.TarError, EOFError) as exc:
        raise MalformedExport(f"the export is not a readable tar archive ({exc})") from None
    return written


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (read from its JSON header only)."""
    with path.open("rb") as handle:
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
        except (struct.error, ValueError) as exc:
            raise MalformedExport(f"{path} is not a safetensors file ({exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata or {})
