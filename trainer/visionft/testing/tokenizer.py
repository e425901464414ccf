"""An offline stand-in tokenizer: a small byte-level BPE trained in memory on a fixed corpus.

Real VLM tokenizers cannot be downloaded here, and their 150k-250k vocabularies would make a tiny
model's embedding and ``lm_head`` dominate its size. This tokenizer keeps the properties the trainer
relies on: any UTF-8 text round-trips (byte-level), the architecture's special tokens are single
ids, and the result is a ``PreTrainedTokenizerFast`` that ``save_pretrained``/``AutoTokenizer`` handle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Text the BPE merges are learned from. Fixed, so the same vocabulary comes out on every machine.
_CORPUS = (
    "You are a helpful assistant. Describe the image. What is in this picture? "
    "The image shows a red circle, a blue square, a green triangle and a yellow star. "
    "Count the shapes: one two three four five six seven eight nine ten. "
    "Write the LaTeX representation for this image: \\frac{a}{b} + x^2 = \\sqrt{y}. "
    "user assistant system model USER ASSISTANT question answer the a an of and to in is it "
    "0 1 2 3 4 5 6 7 8 9 colour color shape left right top bottom small large"
)


def build_bpe_tokenizer(
    special_tokens: Sequence[str],
    *,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    named_tokens: Mapping[str, str] | None = None,
    chat_template: str | None = None,
    vocab_size: int = 400,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Builds a byte-level BPE tokenizer whose special tokens take ids 0..len(special_tokens)-1.

    Args:
        special_tokens (Sequence[str]): every token that must be a single id, in id order
            (bos/eos/pad and the image tokens must be among them).
        bos_token (str | None): the beginning-of-sequence token, or None when the family has none.
        eos_token (str): the end-of-sequence token.
        pad_token (str): the padding token.
        named_tokens (Mapping[str, str] | None): model-specific named tokens, e.g.
            ``{"image_token": "<|image_pad|>"}``; they become tokenizer attributes
            (``tokenizer.image_token`` and ``tokenizer.image_token_id``) that processors read.
        chat_template (str | None): a Jinja chat template.
        vocab_size (int): the total vocabulary size (256 bytes + merges + specials). Default: 400.
        padding_side (str): "right" or "left". Default: "right".

    Returns:
        PreTrainedTokenizerFast: the wrapped tokenizer.

    Raises:
        ValueError: a named, bos, eos or pad token is not in ``special_tokens``.
    """
    named = dict(named_tokens or {})
    required = [t for t in (bos_token, eos_token, pad_token, *named.values()) if t is not None]
    missing = [t for t in required if t not in special_tokens]
    if missing:
        raise ValueError(f"special_tokens must contain {missing}: they are used as single-id tokens")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_CORPUS], trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=named or None,
        padding_side=padding_side,
        chat_template=chat_template,
        # The stand-in has no post-processor: chat templates write bos themselves, as real VLM
        # templates do, so the processor must not add a second one.
        add_bos_token=False,
        model_max_length=4096,
    )
    return tokenizer
