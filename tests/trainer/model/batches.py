"""Builds fixed training batches with a processor directly (until the data collator is used here)."""

from __future__ import annotations

import torch
from visionft.model.architectures import get_arch_spec
from visionft.testing.tiny import tiny_image

#: (image colour, answer) pairs: the task the tiny models memorise in the convergence tests.
SAMPLES = [
    ((220, 30, 30), "The square is red."),
    ((30, 30, 220), "The square is blue."),
]


def messages(answer: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def response_labels(input_ids: torch.Tensor, tokenizer, response_start: str) -> torch.Tensor:
    """-100 everywhere except the tokens after the last ``response_start`` marker (the answer)."""
    labels = torch.full_like(input_ids, -100)
    marker = tokenizer(response_start, add_special_tokens=False)["input_ids"]
    for row, ids in enumerate(input_ids.tolist()):
        starts = [
            i + len(marker) for i in range(len(ids) - len(marker) + 1) if ids[i : i + len(marker)] == marker
        ]
        assert starts, f"response marker {response_start!r} not found in row {row}"
        end = len(ids)
        while end > 0 and ids[end - 1] == tokenizer.pad_token_id:
            end -= 1
        labels[row, starts[-1] : end] = input_ids[row, starts[-1] : end]
    return labels


_RESPONSE_MARKERS = {  # architectures whose template differs per checkpoint (no ChatMarkers in the map)
    # Markers keep the leading space the text has in context: byte-level BPE tokenizes " ASSISTANT"
    # and "ASSISTANT" differently.
    "llava": " ASSISTANT:",
    "llava_next": " [/INST]",
    "pixtral": "[/INST]",
}


def response_marker(arch: str, model_type: str) -> str:
    spec = get_arch_spec(model_type)
    if arch in _RESPONSE_MARKERS:
        return _RESPONSE_MARKERS[arch]
    return spec.chat.response


def build_batch(arch: str, processor, model_type: str) -> dict[str, torch.Tensor]:
    """A padded batch of SAMPLES with labels on the responses only."""
    texts = [processor.apply_chat_template(messages(answer), tokenize=False) for _, answer in SAMPLES]
    images = [tiny_image(arch, color=color) for color, _ in SAMPLES]
    images = [[image] for image in images]  # one list of images per sample: unambiguous for every processor
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    batch["labels"] = response_labels(
        batch["input_ids"], processor.tokenizer, response_marker(arch, model_type)
    )
    return dict(batch)
