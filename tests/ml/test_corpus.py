"""Unlearning corpora: JSON Lines validation with line numbers, automatic spans, token flags."""

from __future__ import annotations

import json

import pytest

from app.ml.corpus import (
    CorpusError,
    Document,
    documents_from_json,
    encode_document,
    mark_harmful_spans,
    parse_lines,
    read_corpus,
    with_spans,
)
from app.ml.errors import InputError
from tests.factories import tiny_tokenizer


def lines(*objects) -> list[bytes]:
    return [o if isinstance(o, bytes) else json.dumps(o).encode() for o in objects]


def test_valid_lines_blank_lines_and_bom():
    raw = [b'\xef\xbb\xbf{"text": "a b c", "harmful_spans": [[2, 3], [0, 1]]}', b"", b"  ",
           b'{"text": "plain", "id": 7}']  # fmt: skip
    docs = list(parse_lines(raw))
    assert docs == [Document("a b c", ((0, 1), (2, 3))), Document("plain", None, "7")]
    assert docs[0].harmful_text == ["a", "b"]


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"harmful_spans": []}, "`text` must be a non-empty string"),
        ({"text": "   "}, "`text` must be a non-empty string"),
        ({"text": 5}, "`text` must be a non-empty string"),
        ({"text": "abc", "harmful_spans": [[1, 9]]}, "is not inside the text"),
        ({"text": "abc", "harmful_spans": [[2, 1]]}, "is not inside the text"),
        ({"text": "abcdef", "harmful_spans": [[0, 3], [2, 4]]}, "overlap"),
        ({"text": "abc", "harmful_spans": [["0", 1]]}, "two integers"),
        ({"text": "abc", "harmful_spans": [[True, 1]]}, "two integers"),
        ({"text": "abc", "harmful_spans": "0-1"}, "must be a list"),
        ({"text": "abc", "harmful_span": [[0, 1]]}, "unknown field 'harmful_span'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_lines_name_their_line(bad, fragment):
    raw = lines({"text": "fine"}, b"", bad)
    with pytest.raises(CorpusError) as caught:
        list(parse_lines(raw))
    assert caught.value.line == 3
    assert str(caught.value).startswith("line 3: ") and fragment in str(caught.value)


def test_invalid_json_and_utf8_name_their_line():
    with pytest.raises(CorpusError, match=r"^line 2: invalid JSON"):
        list(parse_lines([b'{"text": "x"}', b'{"text": ']))
    with pytest.raises(CorpusError, match=r"^line 1: not UTF-8"):
        list(parse_lines([b'{"text": "\xff"}']))


def test_touching_spans_are_fine():
    [doc] = parse_lines(lines({"text": "abcdef", "harmful_spans": [[0, 3], [3, 6]]}))
    assert doc.harmful_spans == ((0, 3), (3, 6))


def test_files_empty_missing_json_list(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match="holds no document"):
        read_corpus(empty)
    with pytest.raises(InputError, match="no corpus file"):
        read_corpus(tmp_path / "missing.jsonl")
    listed = tmp_path / "docs.json"
    listed.write_text(json.dumps(["one", {"text": "two", "harmful_spans": [[0, 3]]}]))
    assert [d.text for d in read_corpus(listed)] == ["one", "two"]
    with pytest.raises(InputError, match=r"forget\[1\]: `text` must be"):
        documents_from_json(["ok", {"text": ""}])


def test_automatic_spans_from_the_classifier_and_a_lexicon():
    [spans] = mark_harmful_spans(["You are a stupid idiot, Bob."])
    text = "You are a stupid idiot, Bob."
    assert [text[a:b] for a, b in spans] == ["stupid", "idiot"]
    [spans] = mark_harmful_spans(["the wugs are bad"], lexicon=["WUGS"])
    assert spans == ((4, 8),)
    given = Document("stupid", ())  # explicitly nothing harmful: left alone
    marked = with_spans([given, Document("stupid")])
    assert marked[0].harmful_spans == () and marked[1].harmful_spans == ((0, 6),)


def test_token_flags_follow_the_spans_and_long_documents_are_cut():
    tokenizer = tiny_tokenizer()
    doc = Document("ab cd ef", ((3, 5),))
    [piece] = encode_document(tokenizer, doc, max_length=64)
    offsets = tokenizer(doc.text, return_offsets_mapping=True)["offset_mapping"]
    expected = [a < 5 and b > 3 and b > a for a, b in offsets]
    assert piece.harmful == expected and sum(expected) == 2
    pieces = encode_document(tokenizer, Document("x" * 50, ((45, 50),)), max_length=16)
    assert [len(p.input_ids) for p in pieces][:3] == [16, 16, 16]
    assert any(pieces[-1].harmful)  # the span at the end survived the cut
