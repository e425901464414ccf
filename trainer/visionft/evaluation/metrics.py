"""The metrics of ``visionft_api.evaluation.METRICS``: one scorer per name, each giving a corpus value and
one value per sample (the gallery shows those, and sorts by them).

Libraries, not hand-written versions, where one is the field's reference:

- ``cer``, ``wer``: jiwer (Levenshtein alignments through RapidFuzz). The corpus value is the total number
  of edits over the total reference length, as jiwer computes it for lists; a sample's value is its own.
- ``bleu``: sacrebleu's corpus BLEU (0-100, its default 13a tokenizer), the score papers report; a
  sample's value is sacrebleu's sentence BLEU (with its default smoothing).
- ``rougeL``: Google's ``rouge-score`` (ROUGE-L F-measure, its tokenizer, no stemming); the corpus value
  is the mean over samples, as most reports give it.

Exact match, normalized exact match and the two JSON metrics are small functions here: the normalization
is SQuAD's (lower case, no punctuation, no articles ``a an the``, single spaces), and the JSON field
match compares the leaves of the reference object by their dotted paths.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from visionft_api.evaluation import METRICS


@dataclass(frozen=True)
class Score:
    """One metric over the evaluated samples.

    Attributes:
        value (float): the corpus value.
        per_sample (list[float]): one value per sample, in the samples' order.
    """

    value: float
    per_sample: list[float]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: ``" The Red.\\n"`` -> ``"red"``."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """1 where the prediction equals the reference (surrounding whitespace ignored)."""
    per = [float(p.strip() == r.strip()) for p, r in zip(predictions, references, strict=True)]
    return Score(_mean(per), per)


def normalized_exact_match(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """1 where ``normalize_answer`` makes them equal."""
    per = [
        float(normalize_answer(p) == normalize_answer(r))
        for p, r in zip(predictions, references, strict=True)
    ]
    return Score(_mean(per), per)


def _error_rate(process: Callable[..., Any], predictions: Sequence[str], references: Sequence[str]) -> Score:
    per, edits, length = [], 0, 0
    for prediction, reference in zip(predictions, references, strict=True):
        out = process(reference, prediction)
        errors = out.substitutions + out.deletions + out.insertions
        size = out.substitutions + out.deletions + out.hits
        per.append(errors / size if size else float(errors > 0))
        edits, length = edits + errors, length + size
    return Score(edits / length if length else 0.0, per)


def character_error_rate(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """Character edits (substitutions, deletions, insertions) per reference character, by jiwer."""
    import jiwer

    return _error_rate(jiwer.process_characters, predictions, references)


def word_error_rate(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """Word edits per reference word, by jiwer."""
    import jiwer

    return _error_rate(jiwer.process_words, predictions, references)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """sacrebleu's corpus BLEU (0-100); per sample, its sentence BLEU."""
    import sacrebleu

    corpus = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    per = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references, strict=True)]
    return Score(float(corpus), [float(v) for v in per])


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """ROUGE-L F-measure (0-1) by rouge-score; the corpus value is the mean."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    per = [float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references, strict=True)]
    return Score(_mean(per), per)


def parse_json(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` is one JSON value, allowing a Markdown code fence around it (models
    often answer in one); ``(False, None)`` otherwise."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        return True, json.loads(body)
    except ValueError:
        return False, None


def json_leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of a JSON value by dotted path: ``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c.0": 2}``.
    An empty object or list is a leaf of its own."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, child in items:
        out.update(json_leaves(child, f"{prefix}.{key}" if prefix else str(key)))
    return out


def json_validity(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """1 where the prediction parses as JSON (``parse_json``); the references are not read."""
    per = [float(parse_json(p)[0]) for p in predictions]
    return Score(_mean(per), per)


def json_field_match(predictions: Sequence[str], references: Sequence[str]) -> Score:
    """The share of the reference object's leaves that the prediction has at the same path with an equal
    value (0 for a prediction that is not JSON); the corpus value is the mean over samples."""
    per = []
    for prediction, reference in zip(predictions, references, strict=True):
        _, expected = parse_json(reference)
        valid, got = parse_json(prediction)
        want = json_leaves(expected)
        have = json_leaves(got) if valid else {}
        per.append(sum(1 for k, v in want.items() if k in have and have[k] == v) / len(want) if want else 0.0)
    return Score(_mean(per), per)


SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], Score]] = {
    "exactMatch": exact_match,
    "normalizedExactMatch": normalized_exact_match,
    "cer": character_error_rate,
    "wer": word_error_rate,
    "bleu": bleu,
    "rougeL": rouge_l,
    "jsonValidity": json_validity,
    "jsonFieldMatch": json_field_match,
}


def score(metric: str, predictions: Sequence[str], references: Sequence[str]) -> Score:
    """Scores ``predictions`` against ``references`` by ``metric`` (a name of ``METRICS``).

    Raises:
        KeyError: ``metric`` is not a metric (the schema rejects such names before).
    """
    return SCORERS[metric](predictions, references)


def reference_problem(metric: str, reference: str) -> str | None:
    """Why ``reference`` can't serve ``metric`` (per ``METRICS[metric].reference``), or None."""
    need = METRICS[metric].reference
    if need == "none":
        return None
    if not reference.strip():
        return "its reference answer is empty"
    if need == "json":
        valid, value = parse_json(reference)
        if not valid or not isinstance(value, dict) or not value:
            return "its reference answer is not a non-empty JSON object"
    return None
