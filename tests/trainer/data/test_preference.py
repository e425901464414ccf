"""PreferenceCollator on every tiny architecture: the chosen rows then the rejected rows, the answer tokens
marked exactly, the prompt shared, padding that changes no log-probability; records in the column forms
(instruction + image, messages + images, TRL's conversational pairs); bad pairs refused or skipped with the
field named; the dataset's columns checked up front."""

from __future__ import annotations

import datasets
import pytest
import torch
from visionft.data.errors import BadSampleError
from visionft.data.preference import COMPLETION_MASK, PreferenceCollator, PreferenceFormatter, to_preference
from visionft.job.preference import answer_log_probs, check_columns
from visionft.testing.tiny import TINY_ARCHS, tiny_image
from visionft_api.recipe import TrainingRecipe

from .test_collator import FRAMING, tiny


def pair(arch, chosen="red", rejected="blue", colour=(200, 30, 30)):
    return {
        "image": tiny_image(arch, colour),
        "instruction": "What colour is the square?",
        "chosen": chosen,
        "rejected": rejected,
    }


def marked_text(batch, row, tokenizer) -> str:
    ids = batch["input_ids"][row][batch[COMPLETION_MASK][row].bool()]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_chosen_rows_then_rejected_rows_with_exactly_the_answers_marked(arch):
    model, processor = tiny(arch)
    collator = PreferenceCollator(model, processor)
    records = [pair(arch), pair(arch, chosen="a green square", rejected="yellow", colour=(30, 200, 30))]
    batch = collator(records)
    assert batch["input_ids"].shape[0] == 4 and "labels" not in batch
    before, after = FRAMING[arch]
    want = ["red", "a green square", "blue", "yellow"]
    for row, answer in enumerate(want):
        assert marked_text(batch, row, processor.tokenizer) == f"{before}{answer}{after}"
    # Each pair's two rows share the prompt token for token (images expanded), up to the answer.
    for i in range(2):
        chosen, rejected = batch["input_ids"][i], batch["input_ids"][i + 2]
        start_c = int(batch[COMPLETION_MASK][i].nonzero()[0, 0])
        start_r = int(batch[COMPLETION_MASK][i + 2].nonzero()[0, 0])
        assert start_c == start_r and torch.equal(chosen[:start_c], rejected[:start_r])
    # The model takes the batch, and padding changes no answer's log-probability: each row scored alone
    # gives the same number as in the padded batch of four.
    device = torch.device("cpu")
    with torch.no_grad():
        together = answer_log_probs(model, batch, device)
        alone = []
        for record in records:
            chosen, rejected = collator.encode_pair(record)
            alone += [answer_log_probs(model, collator.pad([seq]), device)[0] for seq in (chosen, rejected)]
    order = [alone[0], alone[2], alone[1], alone[3]]  # alone is (c0, r0, c1, r1); the batch is c0 c1 r0 r1
    assert torch.allclose(together, torch.stack(order), atol=1e-4)
    assert torch.isfinite(together).all() and (together < 0).all()


def test_record_forms_map_to_the_same_pair():
    image = tiny_image("qwen2_vl")
    plain = to_preference({"image": image, "instruction": "Colour?", "chosen": "red", "rejected": "blue"})
    assert plain == {
        "prompt": [{"role": "user", "content": "Colour?"}],
        "chosen": [{"role": "assistant", "content": "red"}],
        "rejected": [{"role": "assistant", "content": "blue"}],
        "images": [image],
    }
    # TRL's conversational preference form, with the recipe's column names.
    conversational = to_preference(
        {
            "conversation": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
            "pictures": [image, image],
            "good": [{"role": "assistant", "content": "red"}],
            "bad": [{"role": "assistant", "content": "blue"}],
        },
        columns={"messages": "conversation", "images": "pictures", "chosen": "good", "rejected": "bad"},
    )
    assert conversational["images"] == [image, image]
    assert conversational["chosen"] == [{"role": "assistant", "content": "red"}]
    # dataset.instruction stands in for a missing prompt column.
    assert to_preference({"chosen": "a", "rejected": "b"}, instruction="Say")["prompt"][0]["content"] == "Say"


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"instruction": "Q", "chosen": "red"}, "rejected", "missing or empty"),
        ({"instruction": "Q", "chosen": "red", "rejected": ""}, "rejected", "missing or empty"),
        ({"chosen": "red", "rejected": "blue"}, "instruction", "dataset.instruction"),
        (
            {"instruction": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "chosen",
            "assistant",
        ),
        ({"instruction": "Q", "chosen": "red", "rejected": "red"}, "rejected", "the same"),
    ],
)
def test_a_bad_pair_names_its_field(record, field, words):
    model, processor = tiny("qwen2_vl")
    collator = PreferenceCollator(model, processor)
    with pytest.raises(BadSampleError) as err:
        collator([{**record, "__index__": 7}])
    assert err.value.field == field and err.value.index == 7 and words in str(err.value)


def test_too_long_answers_and_prompts_are_bad_samples_never_truncated():
    model, processor = tiny("qwen2_vl")
    record = pair("qwen2_vl", chosen="red " * 40)
    with pytest.raises(BadSampleError, match=r"dpo\.maxCompletionLength=16"):
        PreferenceCollator(model, processor, max_completion_length=16).encode_pair(record, index=0)
    with pytest.raises(BadSampleError, match=r"dpo\.maxPromptLength=8"):
        PreferenceCollator(model, processor, max_prompt_length=8).encode_pair(record, index=0)
    with pytest.raises(BadSampleError, match="max_seq_length=20"):
        PreferenceCollator(model, processor, max_seq_length=20).encode_pair(record, index=0)
    with pytest.raises(ValueError, match="max_prompt_length=0"):
        PreferenceCollator(model, processor, max_prompt_length=0)


def test_skip_drops_bad_pairs_and_counts_them():
    model, processor = tiny("qwen2_vl")
    collator = PreferenceCollator(model, processor, on_bad_sample="skip")
    good = pair("qwen2_vl")
    batch = collator([good, {"instruction": "Q", "chosen": "red"}, good])
    assert batch["input_ids"].shape[0] == 4  # two good pairs: two chosen rows, two rejected rows
    assert collator.skipped == 1 and "rejected" in collator.last_skip_reasons[0]
    # A batch of only bad pairs is replaced by the last good pair (and counted), as for supervised batches.
    batch = collator([{"instruction": "Q", "chosen": "red"}])
    assert batch["input_ids"].shape[0] == 2 and collator.substituted == 1


def test_formatter_uses_the_recipe_columns():
    formatter = PreferenceFormatter({"chosen": "yes", "rejected": "no", "instruction": "q"}, instruction=None)
    out = formatter({"q": "Colour?", "yes": "red", "no": "blue"})
    assert out["chosen"][0]["content"] == "red" and out["rejected"][0]["content"] == "blue"


def _dpo_recipe(**columns):
    return TrainingRecipe.model_validate(
        {
            "method": "dpo",
            "model": {"uri": "builtin://tiny-qwen2-vl"},
            "dataset": {"uri": "/data", "columns": {"chosen": "chosen", "rejected": "rejected", **columns}},
        }
    )


def test_check_columns_names_the_field_of_a_missing_column():
    data = datasets.Dataset.from_dict({"instruction": ["Q"], "chosen": ["a"], "worse": ["b"]})
    with pytest.raises(ValueError) as err:
        check_columns(_dpo_recipe(), data)
    message = str(err.value)
    assert message.startswith("dataset.columns.rejected:") and "'rejected'" in message and "worse" in message
    check_columns(_dpo_recipe(rejected="worse"), data, None)  # named right: accepted
    with pytest.raises(ValueError, match=r"^dataset.columns.messages: .*'conversation'"):
        check_columns(_dpo_recipe(messages="conversation", rejected="worse"), data)
