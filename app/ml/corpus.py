"""Unlearning corpora: JSON Lines of documents with their harmful character spans.

One document a line: `{"text": "...", "harmful_spans": [[start, end], ...]}` (character offsets
into `text`, end exclusive; optional `id` and `meta` keys are kept, any other key is an error so a
misspelt field is never silently ignored). Blank lines are skipped. Every error names its line.

Overlapping spans are an error (touching ones are fine).

Without `harmful_spans`, the harmful words are marked automatically (`mark_harmful_spans`): every
word (a run of letters, digits, `'` or `-`) that the offline judge's classifier
(`alt-profanity-check`) scores at or above `threshold` as offensive, plus every word of an optional
lexicon (case-insensitive). Word-level scores are a coarse signal (the classifier was trained on
whole comments): give spans explicitly when you have them, or a lexicon for your domain.
An explicit empty list means "nothing harmful here" (the document then only counts for `ga`).

`encode_document` turns a document into token ids plus, per token, whether it lies in a harmful
span (any overlap of its characters): what `masked_ga` puts its gradient on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.ml.errors import InputError

if TYPE_CHECKING:  # the API validates corpora with this module: no torch/transformers at import
    from transformers import PreTrainedTokenizerBase

Span = tuple[int, int]
ALLOWED_KEYS = frozenset({"text", "harmful_spans", "id", "meta"})
MAX_LINE_BYTES = 1_000_000
DEFAULT_THRESHOLD = 0.8
_WORD = re.compile(r"[\w'-]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


class CorpusError(InputError):
    """A corpus line that cannot be used; `line` is 1-based (None: not about one line)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class Document:
    text: str
    harmful_spans: tuple[Span, ...] | None = None  # None: not annotated (marked automatically)
    id: str | None = None

    @property
    def harmful_text(self) -> list[str]:
        return [self.text[a:b] for a, b in self.harmful_spans or ()]


def document_json(document: Document) -> dict[str, Any]:
    """The normalised JSON of a document (how corpora and job specs store it)."""
    data: dict[str, Any] = {"text": document.text}
    if document.harmful_spans is not None:
        data["harmful_spans"] = [[start, end] for start, end in document.harmful_spans]
    if document.id is not None:
        data["id"] = document.id
    return data


def check_unicode(document: Document) -> Document:
    """The document, or CorpusError when its text or id holds an unpaired surrogate (a JSON
    escape such as "\\ud800" alone): not valid Unicode, so neither storable nor tokenizable."""
    if _SURROGATE.search(document.text) or (document.id and _SURROGATE.search(document.id)):
        raise CorpusError("an unpaired surrogate escape (\\ud800-\\udfff): not valid Unicode")
    return document


def parse_document(data: Any, line: int | None = None) -> Document:
    """One document from its JSON value: an object as above, or a bare string (no spans)."""
    if isinstance(data, str):
        data = {"text": data}
    if not isinstance(data, dict):
        raise CorpusError("expected a JSON object with a `text` field", line)
    unknown = sorted(set(data) - ALLOWED_KEYS)
    if unknown:
        raise CorpusError(
            f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(ALLOWED_KEYS))})", line
        )
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CorpusError("`text` must be a non-empty string", line)
    spans = data.get("harmful_spans")
    doc_id = data.get("id")
    if doc_id is not None and not isinstance(doc_id, str | int):
        raise CorpusError("`id` must be a string or an integer", line)
    return Document(
        text,
        None if spans is None else _check_spans(spans, len(text), line),
        None if doc_id is None else str(doc_id),
    )


def _check_spans(spans: Any, length: int, line: int | None) -> tuple[Span, ...]:
    if not isinstance(spans, list):
        raise CorpusError("`harmful_spans` must be a list of [start, end] pairs", line)
    checked = []
    for i, span in enumerate(spans):
        where = f"harmful_spans[{i}]"
        if (
            not isinstance(span, list | tuple)
            or len(span) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise CorpusError(f"{where} must be [start, end], two integers", line)
        start, end = span
        if not 0 <= start < end <= length:
            raise CorpusError(
                f"{where} = [{start}, {end}] is not inside the text "
                f"(need 0 <= start < end <= {length})",
                line,
            )
        checked.append((start, end))
    ordered = sorted(checked)
    for (a, b), (c, d) in pairwise(ordered):
        if c < b:
            raise CorpusError(f"harmful_spans [{a}, {b}] and [{c}, {d}] overlap", line)
    return tuple(ordered)


def _merge(spans: Iterable[Span]) -> tuple[Span, ...]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((a, b) for a, b in merged)


def parse_line(raw: str | bytes, line: int) -> Document | None:
    """One JSON Lines line (None when blank)."""
    if len(raw) > MAX_LINE_BYTES:
        raise CorpusError(f"longer than {MAX_LINE_BYTES} bytes", line)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"not UTF-8 (byte {exc.start})", line) from None
    raw = raw.lstrip("\ufeff") if line == 1 else raw
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"invalid JSON: {exc.msg} (column {exc.colno})", line) from None
    return parse_document(data, line)


def parse_lines(lines: Iterable[str | bytes]) -> Iterator[Document]:
    """Documents of JSON Lines, validated line by line (the first bad line raises)."""
    for number, raw in enumerate(lines, start=1):
        document = parse_line(raw, number)
        if document is not None:
            yield document


def read_corpus(path: str | Path) -> list[Document]:
    """A `.jsonl` file (or a `.json` list of documents/strings)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no corpus file at {path}")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: not a JSON file: {exc}") from None
        documents = documents_from_json(data, where=str(path))
    else:
        with path.open("rb") as handle:
            documents = list(parse_lines(handle))
    if not documents:
        raise InputError(f"{path}: the corpus holds no document")
    return documents


def documents_from_json(items: Any, *, where: str = "forget") -> list[Document]:
    """An inline list (a job's `forget`/`retain`): documents or bare strings."""
    if not isinstance(items, list):
        raise InputError(f"{where}: must be a list of documents or strings")
    documents = []
    for i, item in enumerate(items):
        try:
            documents.append(parse_document(item))
        except CorpusError as exc:
            raise InputError(f"{where}[{i}]: {exc.reason}") from None
    return documents


def mark_harmful_spans(
    texts: Sequence[str], *, lexicon: Iterable[str] = (), threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[Span, ...]]:
    """For each text, the spans of its words that are offensive by the classifier or listed."""
    from profanity_check import predict_prob  # sklearn: loaded only when marking

    listed = {word.casefold() for word in lexicon}
    words = [[(m.start(), m.end(), m.group()) for m in _WORD.finditer(t)] for t in texts]
    flat = [w for ws in words for _, _, w in ws]
    probs = iter(predict_prob(flat).tolist() if flat else [])
    marked = []
    for ws in words:
        spans = []
        for start, end, word in ws:
            if next(probs) >= threshold or word.casefold() in listed:
                spans.append((start, end))
        marked.append(_merge(spans))
    return marked


def with_spans(
    documents: Sequence[Document],
    *,
    lexicon: Iterable[str] = (),
    threshold: float = DEFAULT_THRESHOLD,
) -> list[Document]:
    """The documents, those without spans marked automatically."""
    todo = [d for d in documents if d.harmful_spans is None]
    marked = iter(mark_harmful_spans([d.text for d in todo], lexicon=lexicon, threshold=threshold))
    return [
        Document(d.text, next(marked), d.id) if d.harmful_spans is None else d for d in documents
    ]


@dataclass(frozen=True)
class EncodedDocument:
    input_ids: list[int]
    harmful: list[bool]  # per token: does it overlap a harmful span?


def encode_document(
    tokenizer: PreTrainedTokenizerBase, document: Document, *, max_length: int
) -> list[EncodedDocument]:
    """Token ids and harmful-token flags; a long document is cut into `max_length` pieces so
    none of its harmful tokens is dropped."""
    if not tokenizer.is_fast:
        raise InputError("corpus unlearning needs a fast tokenizer (character offsets)")
    encoded = tokenizer(document.text, return_offsets_mapping=True, add_special_tokens=True)
    spans = document.harmful_spans or ()
    flags = [
        end > start and any(start < b and end > a for a, b in spans)
        for start, end in encoded["offset_mapping"]
    ]
    ids = encoded["input_ids"]
    return [
        EncodedDocument(ids[i : i + max_length], flags[i : i + max_length])
        for i in range(0, len(ids), max_length)
        if len(ids[i : i + max_length]) >= 2  # a lone token predicts nothing
    ]
