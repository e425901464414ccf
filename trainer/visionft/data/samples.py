"""One dataset record to one conversation: chat messages with image placeholders, plus the image references.

Three record shapes are understood (the same ones TRL's vision SFT accepts):

- ``{"messages": [...]}``: chat turns whose content is a string or a list of parts
  ``{"type": "image", "image": <ref>}`` / ``{"type": "text", "text": ...}``. An image part without a
  reference (``{"type": "image"}``) takes the next entry of the ``images`` column.
- ``{"prompt": ..., "completion": ...}``: strings (a user turn and an assistant turn) or lists of messages.
- either of the above with an ``images`` column (a list) or an ``image`` column (one image). When no
  message has an image part, the images are put in front of the first user turn's text, in order.

The messages returned carry only ``{"type": "image"}`` placeholders, which is what every chat template
expects; the references are returned separately, in order, for ``ImageLoader``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from visionft.data.errors import BadSampleError

_ROLES = ("system", "user", "assistant")
# Keys under which an image part may carry its reference (OpenAI-style image_url included).
_IMAGE_KEYS = ("image", "url", "path", "image_url")


@dataclass
class Conversation:
    """A normalized sample.

    Attributes:
        messages (list[dict]): turns with ``role`` and ``content`` (a list of parts).
        images (list[Any]): image references in the order their placeholders appear.
    """

    messages: list[dict]
    images: list[Any] = field(default_factory=list)

    def images_before(self, turn: int) -> int:
        """How many images the turns before ``turn`` hold (for rendering a prefix of the conversation)."""
        return sum(
            1 for message in self.messages[:turn] for part in message["content"] if part["type"] == "image"
        )


def to_conversation(sample: dict, index: int | None = None) -> Conversation:
    """Normalizes one record (see the module docstring).

    Raises:
        BadSampleError: the record has none of the known shapes, an unknown role or part type, or
            placeholders and images that do not add up.
    """
    if not isinstance(sample, dict):
        raise BadSampleError(f"a sample must be a mapping of columns; got {type(sample).__name__}", index)
    column_images = _column_images(sample, index)
    if sample.get("messages") is not None:
        turns = sample["messages"]
        where = "messages"
    elif sample.get("prompt") is not None and sample.get("completion") is not None:
        turns = _prompt_completion(sample["prompt"], sample["completion"], index)
        where = "prompt/completion"
    else:
        raise BadSampleError(
            "the sample has neither a 'messages' column nor 'prompt' and 'completion'; map the dataset to "
            f"one of these (columns present: {sorted(sample)})",
            index,
        )
    if not isinstance(turns, list) or not turns:
        raise BadSampleError("the conversation is empty or not a list of turns", index, where)

    messages, inline = [], []
    pending = list(column_images)
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES:
            role = turn.get("role") if isinstance(turn, dict) else None
            raise BadSampleError(
                f"turn {t} has role {role!r}; use one of {list(_ROLES)}", index, f"{where}[{t}]"
            )
        parts = []
        for p, part in enumerate(_parts(turn.get("content"), index, f"{where}[{t}].content")):
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text") or "")})
            elif kind in ("image", "image_url"):
                ref = next((part[k] for k in _IMAGE_KEYS if part.get(k) is not None), None)
                if isinstance(ref, dict) and "url" in ref and "bytes" not in ref:
                    ref = ref["url"]  # OpenAI form {"image_url": {"url": ...}}
                if ref is None:
                    if not pending:
                        raise BadSampleError(
                            "an image part has no image and the images column has no more entries; give "
                            "each image part an image or list one image per placeholder",
                            index,
                            f"{where}[{t}].content[{p}]",
                        )
                    ref = pending.pop(0)
                parts.append({"type": "image"})
                inline.append(ref)
            else:
                raise BadSampleError(
                    f"part type {kind!r} is not supported; use 'text' or 'image'",
                    index,
                    f"{where}[{t}].content[{p}]",
                )
        messages.append({"role": turn["role"], "content": parts})

    if pending:
        if inline:
            raise BadSampleError(
                f"{len(pending)} image(s) of the images column have no placeholder while others do; give "
                "every image an image part, or none (then all go before the first user text)",
                index,
                "images",
            )
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSampleError("the sample has images but no user turn to attach them to", index, where)
        first_user["content"] = [{"type": "image"} for _ in pending] + first_user["content"]
        inline = pending
    return Conversation(messages=messages, images=inline)


def _column_images(sample: dict, index: int | None) -> list:
    images = sample.get("images")
    if images is None:
        single = sample.get("image")
        return [] if single is None else [single]
    if not isinstance(images, (list, tuple)):
        return [images]
    return [img for img in images if img is not None]


def _parts(content: Any, index: int | None, where: str) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return content
    raise BadSampleError("content must be a string or a list of {'type': ...} parts", index, where)


def _prompt_completion(prompt: Any, completion: Any, index: int | None) -> list:
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion]
    raise BadSampleError(
        "prompt and completion must both be strings or both be lists of messages", index, "prompt/completion"
    )
