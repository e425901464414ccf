"""The committed CRD files are exactly what the generator produces from the pydantic models."""

from __future__ import annotations

from visionft_api import crd


def test_crd_files_match_the_generator() -> None:
    expected = crd.render_crd()
    for path in crd.CRD_PATHS:
        assert path.exists(), f"{path} is missing: run `python -m visionft_api.crd --write`"
        assert path.read_text() == expected, f"{path} is stale: run `python -m visionft_api.crd --write`"


def test_crd_has_printer_columns_status_and_short_name() -> None:
    doc = crd.build_crd()
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:7] == [
        "Phase",
        "Reason",
        "Progress",
        "Loss",
        "ETA",
        "Eval",
        "Age",
    ]
    # Eval is the trainer's one-line summary of the headline metric (status.evaluation.summary).
    assert version["additionalPrinterColumns"][5]["jsonPath"] == ".status.evaluation.summary"
    assert doc["spec"]["names"]["shortNames"] == ["vft"]
