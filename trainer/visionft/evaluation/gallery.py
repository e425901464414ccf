"""``gallery.html``: what the model answers, before and after training, sample by sample.

One self-contained page: each row shows the image (inlined as a data URI, scaled to at most
``THUMBNAIL_SIDE`` pixels), the prompt, the reference, the base model's answer and the output's, and the
per-sample metric values; rows are sorted worst first by the output's headline metric (ties by sample
index), so the cases to look at come first. No scripts, no styles or fonts from elsewhere: it opens from a
bucket, a laptop or an artifact store alike. Every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from visionft_api.evaluation import EVAL_LOSS, higher_is_better

THUMBNAIL_SIDE = 224

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border:1px solid #ccc;padding:.4em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3}
td.img img{max-width:224px;image-rendering:pixelated}
pre{white-space:pre-wrap;margin:0;font-family:ui-monospace,monospace}
.bad{background:#fdecea}.good{background:#e9f6ec}
.summary td,.summary th{text-align:right}.summary td:first-child,.summary th:first-child{text-align:left}
"""


def worst_first(document: dict[str, Any]) -> list[dict[str, Any]]:
    """``document["perSample"]`` (the ``metrics.json`` form) sorted worst first by the headline metric of the
    answer after training (before, when there is no after)."""
    metric = document["metric"]
    higher = document["higherIsBetter"][metric]

    def key(entry: dict[str, Any]) -> tuple[float, int]:
        side = entry.get("after") or entry.get("before") or {}
        value = side.get("scores", {}).get(metric)
        if value is None:
            return (float("-inf"), entry["index"])
        return (value if higher else -value, entry["index"])

    return sorted(document["perSample"], key=key)


def _thumbnail(image) -> str:
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if metric == "bleu" else f"{value:.3f}"


def _answer_cell(side: dict[str, Any] | None, metric: str, reference: str) -> str:
    if side is None:
        return "<td>-</td>"
    prediction = side["prediction"]
    value = side["scores"].get(metric)
    best = 1.0 if higher_is_better(metric) else 0.0
    css = "good" if value == best else "bad" if prediction.strip() != reference.strip() else ""
    return (
        f'<td class="{css}"><pre>{html.escape(prediction) or "&nbsp;"}</pre>'
        f"<small>{html.escape(metric)} {_fmt(metric, value)}</small></td>"
    )


def render(document: dict[str, Any], images: Sequence[Any | None], title: str, limit: int) -> str:
    """The gallery page for a ``metrics.json`` document.

    Args:
        document (dict): ``EvaluationRecord.document(...)``.
        images (Sequence[PIL.Image.Image | None]): each sample's first image, in ``perSample`` order.
        title (str): the page title (the run's name).
        limit (int): at most this many rows, worst first.

    Returns:
        str: the HTML text.
    """
    metric = document["metric"]
    names = [*document["metrics"], EVAL_LOSS]
    by_index = {entry["index"]: image for entry, image in zip(document["perSample"], images, strict=True)}
    rows = []
    for rank, entry in enumerate(worst_first(document)[:limit], start=1):
        image = by_index.get(entry["index"])
        picture = (
            f'<img alt="sample {entry["index"]}" src="{_thumbnail(image)}">' if image is not None else "-"
        )
        after = entry.get("after") or {}
        scores = ", ".join(
            f"{html.escape(m)} {_fmt(m, v)}" for m, v in (after.get("scores") or {}).items() if m != metric
        )
        rows.append(
            "<tr>"
            f"<td>{rank}<br><small>#{entry['index']}</small></td>"
            f'<td class="img">{picture}</td>'
            f"<td><pre>{html.escape(entry['prompt'])}</pre></td>"
            f"<td><pre>{html.escape(entry['reference'])}</pre></td>"
            f"{_answer_cell(entry.get('before'), metric, entry['reference'])}"
            f"{_answer_cell(entry.get('after'), metric, entry['reference'])}"
            f"<td><small>{scores or '-'}</small></td>"
            "</tr>"
        )
    summary = []
    for name in names:
        before = (document.get("base") or {}).get("values", {}).get(name)
        after = (document.get("final") or {}).get("values", {}).get(name)
        if before is None and after is None:
            continue
        direction = "higher is better" if document["higherIsBetter"].get(name, True) else "lower is better"
        summary.append(
            f"<tr><td>{html.escape(name)} <small>({direction})</small></td>"
            f"<td>{_fmt(name, before)}</td><td>{_fmt(name, after)}</td></tr>"
        )
    best = document.get("best")
    best_line = (
        f"best {html.escape(best['metric'])} {_fmt(best['metric'], best['values'].get(best['metric']))} at step "
        f"{best['step']}; the output holds the {html.escape(document['outputFrom'])} step's weights"
        if best
        else ""
    )
    shown = min(limit, len(document["perSample"]))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: evaluation gallery</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{document["samples"]} held-out samples of {html.escape(str(document["split"]))}; {shown} shown, worst
first by {html.escape(metric)} after training. {best_line}</p>
<table class="summary"><tr><th>metric</th><th>before</th><th>after</th></tr>{"".join(summary)}</table>
<h2>Samples</h2>
<table><tr><th>rank</th><th>image</th><th>prompt</th><th>reference</th><th>before training</th>
<th>after training</th><th>other metrics (after)</th></tr>
{"".join(rows)}
</table></body></html>
"""


def write(
    path: str | Path,
    document: dict[str, Any],
    image_of: Callable[[int], Any | None],
    title: str,
    limit: int,
) -> Path:
    """Writes ``gallery.html`` for ``document``; ``image_of(position)`` loads the image of the
    ``position``-th sample of ``perSample`` (only for the rows shown)."""
    shown = {entry["index"] for entry in worst_first(document)[:limit]}
    images = [
        image_of(position) if entry["index"] in shown else None
        for position, entry in enumerate(document["perSample"])
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(document, images, title, limit), encoding="utf-8")
    return path
