"""FolderTar: the streamed tar reads back as the folder, at exactly the announced size."""

from __future__ import annotations

import io
import tarfile

from app.api.tarstream import FolderTar


def test_a_folder_streams_as_a_tar_of_the_announced_size(tmp_path):
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    files = {
        "empty.txt": b"",
        "block.bin": b"x" * 512,
        "odd.bin": bytes(range(256)) * 9 + b"end",
        f"sub/{'long-name-' * 15}.json": b'{"a": 1}',  # over 100 characters: a PAX header
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    tar = FolderTar(folder, "v1-peft")
    data = b"".join(tar)
    assert len(data) == tar.size
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert members["v1-peft"].isdir() and members["v1-peft/sub"].isdir()
        for name, content in files.items():
            member = archive.extractfile(members[f"v1-peft/{name}"])
            assert member is not None and member.read() == content
    assert set(members) == {"v1-peft", "v1-peft/sub", *(f"v1-peft/{n}" for n in files)}
