"""Corpus unlearning's data: documents encoded into pieces, pieces collated into batches.

A piece is an `EncodedDocument` whose `harmful` flags mark the tokens whose loss counts: the
harmful-span tokens of a forget document, or every token (`all_tokens`: method `ga`, the retain
text). Training cycles through the pieces in batches, reshuffled every pass.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from app.ml.corpus import Document, EncodedDocument, encode_document, with_spans
from app.ml.errors import InputError
from app.ml.models import LoadedModel
from app.ml.unlearn_params import UnlearnParams


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T], right padded
    attention: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T-1] bool: positions whose next token counts


def forget_pieces(
    lm: LoadedModel, forget: Sequence[Document], params: UnlearnParams, *, spans: bool
) -> tuple[list[EncodedDocument], list[str]]:
    """The forget set's pieces that have a target token, and warnings. With `spans` the targets
    are the harmful spans (marked automatically where a document has none), else every token."""
    if not forget:
        raise InputError("forget: at least one document is needed")
    warnings = []
    if spans:
        unmarked = sum(1 for d in forget if d.harmful_spans is None)
        forget = with_spans(forget, lexicon=params.lexicon, threshold=params.span_threshold)
        if unmarked:
            warnings.append(
                f"{unmarked} forget document(s) had no harmful_spans: their harmful words were "
                "marked automatically (classifier + lexicon)"
            )
    encoded = pieces(lm, forget, params.max_length, all_tokens=not spans)
    encoded = [p for p in encoded if any(p.harmful[1:])]
    if not encoded:
        raise InputError(
            "forget: no harmful token to unlearn: give harmful_spans, a params.lexicon, or use "
            "method 'ga' (every token)"
        )
    return encoded, warnings


def pieces(
    lm: LoadedModel, documents: Sequence[Document], max_length: int, *, all_tokens: bool
) -> list[EncodedDocument]:
    """`documents` encoded in pieces of at most `max_length` tokens (and the model's context)."""
    length = min(max_length, lm.context_length)
    encoded = []
    for document in documents:
        for piece in encode_document(lm.tokenizer, document, max_length=length):
            if all_tokens:
                piece = EncodedDocument(piece.input_ids, [True] * len(piece.input_ids))
            encoded.append(piece)
    return encoded


def collate(pieces: Sequence[EncodedDocument], pad_id: int, device: torch.device) -> Batch:
    width = max(len(p.input_ids) for p in pieces)
    ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pieces), width), dtype=torch.long)
    targets = torch.zeros((len(pieces), width), dtype=torch.bool)
    for i, piece in enumerate(pieces):
        n = len(piece.input_ids)
        ids[i, :n] = torch.tensor(piece.input_ids)
        attention[i, :n] = 1
        targets[i, :n] = torch.tensor(piece.harmful)
    return Batch(ids.to(device), attention.to(device), targets[:, 1:].to(device))


def cycle(pieces: Sequence[EncodedDocument], size: int, rng: random.Random) -> Iterator[list]:
    """Batches of `size` pieces, reshuffled every pass."""
    while True:
        order = list(pieces)
        rng.shuffle(order)
        for i in range(0, len(order), size):
            yield order[i : i + size]
