"""Chat templates for the tiny stand-in processors, written in the style of each real model family.

They render the same turn markers as the real templates (ChatML for Qwen, header ids for Llama 3,
``<start_of_turn>`` for Gemma, ``USER:/ASSISTANT:`` for LLaVA 1.5, ``[INST]`` for Mistral-based
LLaVA-NeXT and Pixtral), so that code which finds assistant turns by those markers (response-only
labels) is exercised on the same strings it meets on real checkpoints. Message content may be a
string or a list of parts ``{"type": "image"}`` / ``{"type": "text", "text": ...}``.

Each template is one line of Jinja on purpose: transformers renders with ``trim_blocks`` and
``lstrip_blocks``, and a one-liner with explicit ``'\\n'`` literals leaves no doubt about whitespace.
"""

from __future__ import annotations


def _content(image: str, text_suffix: str = "") -> str:
    """Jinja that renders ``message['content']``: images as ``image``, text parts verbatim."""
    return (
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
        + ("{{ '" + text_suffix + "' }}" if text_suffix else "")
        + "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )


def chatml(image: str, default_system: str | None) -> str:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``<|im_start|>role\\n ... <|im_end|>\\n``."""
    system = (
        "{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\n"
        + default_system
        + "<|im_end|>\\n' }}{%- endif -%}"
        if default_system
        else ""
    )
    return (
        system
        + "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        + _content(image)
        + "{{ '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def llama3(image: str) -> str:
    """Llama 3.2 Vision: ``<|start_header_id|>role<|end_header_id|>\\n\\n ... <|eot_id|>``."""
    return (
        "{{ bos_token }}{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        + _content(image)
        + "{{ '<|eot_id|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    )


def gemma(image: str) -> str:
    """Gemma 3: ``<start_of_turn>user|model\\n ... <end_of_turn>\\n``; the assistant role is "model"."""
    return (
        "{{ bos_token }}{%- for message in messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\\n' }}" + _content(image) + "{{ '<end_of_turn>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    )


def vicuna(image: str) -> str:
    """LLaVA 1.5: ``USER: <image>\\n... ASSISTANT: ...</s>`` (images before text, as llava-hf renders)."""
    return (
        "{{ bos_token }}{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ message['content'] if message['content'] is string "
        "else message['content'][0]['text'] }}{{ ' ' }}"
        "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}" + _content(image + "\\n", " ") + ""
        "{%- else -%}{{ 'ASSISTANT: ' }}" + _content(image) + "{{ eos_token }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def mistral_inst(image: str, space: bool) -> str:
    """Mistral-style ``[INST] ... [/INST] ...</s>``: LLaVA-NeXT (spaced) and Pixtral (unspaced)."""
    pad = " " if space else ""
    return (
        "{{ bos_token }}{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ '[INST]"
        + pad
        + "' }}"
        + _content(image)
        + "{{ '"
        + pad
        + "[/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ '" + pad + "' }}" + _content(image) + "{{ eos_token }}"
        "{%- endif -%}{%- endfor -%}"
    )
