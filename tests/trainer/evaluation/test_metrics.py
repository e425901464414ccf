"""The metrics against values worked out by hand, and the checks of references before a run."""

from __future__ import annotations

import pytest
from visionft.evaluation import metrics as m
from visionft_api.evaluation import METRICS, better, worse_than


def test_every_metric_of_the_schema_has_a_scorer() -> None:
    assert set(m.SCORERS) == set(METRICS)


def test_exact_and_normalized_exact_match() -> None:
    predictions, references = ["red", " The Red.\n", "blue circle"], ["red", "red", "blue square"]
    assert m.exact_match(predictions, references).per_sample == [1.0, 0.0, 0.0]
    assert m.normalized_exact_match(predictions, references).per_sample == [1.0, 1.0, 0.0]
    assert m.normalized_exact_match(predictions, references).value == pytest.approx(2 / 3)
    assert m.normalize_answer("  A  Blue, SQUARE! ") == "blue square"


def test_error_rates_per_sample_and_over_the_corpus() -> None:
    # "abd" vs "abc": 1 substitution in 3 characters; "" vs "xy": 2 deletions in 2.
    cer = m.character_error_rate(["abd", ""], ["abc", "xy"])
    assert cer.per_sample == [pytest.approx(1 / 3), 1.0]
    assert cer.value == pytest.approx(3 / 5)  # total edits over total reference characters
    # An insertion counts too: "abcd" vs "abc" is 1 edit in 3.
    assert m.character_error_rate(["abcd"], ["abc"]).value == pytest.approx(1 / 3)
    wer = m.word_error_rate(["red circle", "blue"], ["red square", "blue"])
    assert wer.per_sample == [0.5, 0.0] and wer.value == pytest.approx(1 / 3)


def test_bleu_and_rouge_l() -> None:
    same = m.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same.value == pytest.approx(100.0) and same.per_sample == [pytest.approx(100.0)]
    assert m.bleu(["a b c d"], ["w x y z"]).value == pytest.approx(0.0)
    # LCS of "the cat on mat" in "the cat sat on the mat" is 4 tokens: P 4/4, R 4/6, F 0.8.
    assert m.rouge_l(["the cat on mat"], ["the cat sat on the mat"]).value == pytest.approx(0.8)


def test_json_validity_and_field_match() -> None:
    predictions = ['{"a": 1, "b": {"c": "x"}}', '```json\n{"a": 2}\n```', "not json", "[1, 2]"]
    assert m.json_validity(predictions, [""] * 4).per_sample == [1.0, 1.0, 0.0, 1.0]
    references = ['{"a": 1, "b": {"c": "x"}}', '{"a": 1, "b": {"c": "x"}}', '{"a": 1}', '{"a": [1, 2]}']
    # All leaves; one of the two leaves (a differs, b.c missing): 0; not JSON: 0; a list is not {"a": ...}.
    assert m.json_field_match(predictions, references).per_sample == [1.0, 0.0, 0.0, 0.0]
    assert m.json_leaves({"a": {"b": 1}, "c": [2, {"d": None}]}) == {"a.b": 1, "c.0": 2, "c.1.d": None}


def test_reference_problems_name_what_is_missing() -> None:
    assert m.reference_problem("cer", "red") is None
    assert m.reference_problem("cer", "  ") == "its reference answer is empty"
    assert (
        m.reference_problem("jsonFieldMatch", "red") == "its reference answer is not a non-empty JSON object"
    )
    assert m.reference_problem("jsonFieldMatch", '{"a": 1}') is None
    assert m.reference_problem("jsonValidity", "") is None  # reads the prediction only


def test_directions() -> None:
    assert better(0.1, 0.2, "cer") and not better(0.1, 0.2, "exactMatch") and better(1.0, 2.0, "evalLoss")
    assert worse_than(0.4, 0.3, "cer") and not worse_than(0.3, 0.3, "cer") and worse_than(0.2, 0.3, "bleu")
