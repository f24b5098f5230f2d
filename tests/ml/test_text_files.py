import pytest

from app.ml.errors import InputError
from app.ml.text_files import parse_json, read_text_file


def test_reads_utf8_and_drops_a_byte_order_mark(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffcafé".encode())
    assert read_text_file(path) == "café"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such file"),
        (lambda p: p.mkdir() or p, "is a directory, not a file"),
        (lambda p: p.write_bytes(b"ok \xff") and p, r"not UTF-8 text \(byte 3\)"),
    ],
)
def test_each_failure_names_the_file_and_the_problem(tmp_path, make, message):
    path = make(tmp_path / "x")
    with pytest.raises(InputError, match=f"^{tmp_path / 'x'}: {message}"):
        read_text_file(path)


def test_invalid_json_names_the_source_and_line():
    assert parse_json('{"a": 1}', "f.json") == {"a": 1}
    with pytest.raises(InputError, match=r"^f.json: invalid JSON at line 2: "):
        parse_json('{"a":\n ]', "f.json")
