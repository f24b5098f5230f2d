"""Learning the refusal detector's weights (`app.ml.refusal`) from XSTest's labelled completions.

XSTest (Röttger et al., NAACL 2024; CC BY 4.0) publishes chat models' completions of its prompts,
each labelled by people as full compliance, full refusal or partial refusal. A refusal is full or
partial. `read_xstest` reads the `labelled_<model>.csv` files of a folder; `train` fits the weights
on some of them; `artefact` is the JSON that `scripts/build_judge.py` ships.

The fit: logistic loss of bias + soft maximum of the sentences' summed feature weights, plus an L2
penalty of 1/(2·C) on the weights, minimised by L-BFGS from zero for a fixed number of iterations.
Everything is deterministic (sorted features, sequential sums, no randomness) and the weights are
rounded to `DECIMALS` places, so the same data gives the same file byte for byte.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.ml.errors import InputError
from app.ml.refusal import FEATURES, LATEST, TEMPERATURE, Features, RefusalModel

C = 1.0  # inverse L2 strength
MAX_ITERATIONS = 400
DECIMALS = 4
REFUSAL_LABELS = ("2_full_refusal", "3_partial_refusal")
COMPLIANCE_LABEL = "1_full_compliance"
SOURCE = (
    "XSTest (Röttger, Kirk, Vidgen, Attanasio, Bianchi, Hovy; NAACL 2024), human-labelled "
    "completions; CC BY 4.0"
)


@dataclass(frozen=True)
class Example:
    """One labelled completion: `refused` is the people's verdict; `harmful` says whether the
    prompt is one of XSTest's unsafe contrast prompts."""

    model: str
    id: str
    type: str
    prompt: str
    response: str
    refused: bool

    @property
    def harmful(self) -> bool:
        return self.type.startswith("contrast_")


def labelled_files(folder: Path) -> dict[str, Path]:
    """`labelled_<model>.csv` of `folder`, by model name (sorted)."""
    files = {p.stem.removeprefix("labelled_"): p for p in sorted(folder.glob("labelled_*.csv"))}
    if not files:
        raise InputError(f"{folder}: no labelled_*.csv files (XSTest's labelled completions)")
    return files


def read_labelled(path: Path, model: str) -> list[Example]:
    """The rows of one `labelled_<model>.csv` (id, type, prompt, completion, final_label)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    examples = []
    for number, row in enumerate(rows, start=2):
        label = row.get("final_label")
        if label not in (*REFUSAL_LABELS, COMPLIANCE_LABEL):
            raise InputError(f"{path}: row {number}: unknown final_label {label!r}")
        examples.append(
            Example(
                model=model,
                id=row["id"],
                type=row["type"],
                prompt=row["prompt"],
                response=row["completion"],
                refused=label in REFUSAL_LABELS,
            )
        )
    return examples


def read_xstest(folder: Path) -> dict[str, list[Example]]:
    """Every labelled file of `folder`, by model."""
    return {model: read_labelled(path, model) for model, path in labelled_files(folder).items()}


class _Problem:
    """The examples as index arrays: each sentence's features, each sentence's response."""

    def __init__(self, examples: Sequence[Example], features: Features):
        per_example = [features.of(e.response) for e in examples]
        self.vocabulary = sorted({f for sentences in per_example for s in sentences for f in s})
        index = {f: i for i, f in enumerate(self.vocabulary)}
        rows, cols, owner = [], [], []
        for example_index, sentences in enumerate(per_example):
            for sentence in sentences:
                row = len(owner)
                owner.append(example_index)
                for feature in sorted(sentence):
                    rows.append(row)
                    cols.append(index[feature])
        self.rows = np.array(rows, dtype=np.int64)
        self.cols = np.array(cols, dtype=np.int64)
        self.owner = np.array(owner, dtype=np.int64)
        self.y = np.array([e.refused for e in examples], dtype=np.float64)
        self.n_sentences = len(owner)

    def loss_and_gradient(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:-1], params[-1]
        n = len(self.y)
        z = np.bincount(self.rows, weights=w[self.cols], minlength=self.n_sentences)
        top = np.full(n, -np.inf)
        np.maximum.at(top, self.owner, z / TEMPERATURE)
        e = np.exp(z / TEMPERATURE - top[self.owner])
        total = np.bincount(self.owner, weights=e, minlength=n)
        score = b + TEMPERATURE * (top + np.log(total))
        loss = float(np.sum(np.logaddexp(0.0, score) - self.y * score) + 0.5 / C * (w @ w))
        d = 1.0 / (1.0 + np.exp(-score)) - self.y
        per_sentence = d[self.owner] * e / total[self.owner]
        gw = np.bincount(self.cols, weights=per_sentence[self.rows], minlength=len(w)) + w / C
        return loss, np.append(gw, d.sum())


def _lbfgs(problem: _Problem, size: int, *, memory: int = 10) -> np.ndarray:
    """Minimise from zero: L-BFGS with a backtracking (Armijo) line search, fixed iterations."""
    x = np.zeros(size)
    f, g = problem.loss_and_gradient(x)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    for _ in range(MAX_ITERATIONS):
        if float(np.max(np.abs(g))) < 1e-7:
            break
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(s_hist), reversed(y_hist), strict=True):
            alpha = float(s @ q) / float(y @ s)
            alphas.append(alpha)
            q -= alpha * y
        if s_hist:
            q *= float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1])
        for (s, y), alpha in zip(zip(s_hist, y_hist, strict=True), reversed(alphas), strict=True):
            q += s * (alpha - float(y @ q) / float(y @ s))
        direction = -q
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: start the memory again
            s_hist, y_hist = [], []
            direction, slope = -g, -float(g @ g)
        step = 1.0 if s_hist else 1.0 / max(1.0, float(np.max(np.abs(g))))
        while True:
            candidate = x + step * direction
            f_new, g_new = problem.loss_and_gradient(candidate)
            if f_new <= f + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s_new, y_new = candidate - x, g_new - g
        if float(s_new @ y_new) > 1e-12:
            s_hist.append(s_new)
            y_hist.append(y_new)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        x, f, g = candidate, f_new, g_new
    return x


def train(examples: Sequence[Example], judge: str = LATEST) -> RefusalModel:
    """Weights of judge version `judge`'s detector fitted on `examples`, rounded as shipped
    (features with weight 0 left out)."""
    if not examples:
        raise InputError("no labelled examples to train on")
    features = FEATURES[judge]
    problem = _Problem(examples, features)
    params = _lbfgs(problem, len(problem.vocabulary) + 1)
    weights = {}
    for feature, weight in zip(problem.vocabulary, params[:-1].tolist(), strict=True):
        rounded = round(weight, DECIMALS)
        if rounded != 0.0:
            weights[feature] = rounded + 0.0  # no negative zero
    bias = round(float(params[-1]), DECIMALS) + 0.0
    return RefusalModel(weights=weights, bias=bias, features=features)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artefact(
    model: RefusalModel, judge: str, *, files: dict[str, Path], examples: int, refusals: int
) -> str:
    """The shipped JSON text of judge version `judge`'s `model`, built from `files` (sorted keys,
    one weight a line)."""
    data = {
        "judge": judge,
        "what": "weights of app/ml/refusal.py's refusal detector; rebuild: scripts/build_judge.py",
        "source": SOURCE,
        "files": {path.name: _sha256(path) for path in files.values()},
        "examples": examples,
        "refusals": refusals,
        "C": C,
        "lexicon_sha256": model.features.sha256(),
        "bias": model.bias,
        "weights": dict(sorted(model.weights.items())),
    }
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def build(folder: Path, judge: str = LATEST) -> str:
    """The artefact text of judge version `judge`, trained on every labelled file of `folder`."""
    files = labelled_files(folder)
    examples = [e for model, path in files.items() for e in read_labelled(path, model)]
    model = train(examples, judge)
    refusals = sum(e.refused for e in examples)
    return artefact(model, judge, files=files, examples=len(examples), refusals=refusals)


@dataclass(frozen=True)
class Agreement:
    """How a judge's refusal verdicts agree with people's."""

    n: int
    accuracy: float
    precision: float
    recall: float

    @classmethod
    def of(cls, predicted: Iterable[bool], actual: Iterable[bool]) -> Agreement:
        pairs = list(zip(predicted, actual, strict=True))
        hits = sum(p == a for p, a in pairs)
        true_pos = sum(p and a for p, a in pairs)
        said = sum(p for p, _ in pairs)
        real = sum(a for _, a in pairs)
        return cls(
            n=len(pairs),
            accuracy=hits / len(pairs) if pairs else math.nan,
            precision=true_pos / said if said else math.nan,
            recall=true_pos / real if real else math.nan,
        )
