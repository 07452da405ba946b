"""SFT conversations with images -> processor inputs, on the tiny LLaVA and the tiny Qwen2-VL: labels on every
assistant turn only (never on image tokens), the images' tensors batched in row order, padding that leaves each
row's loss alone, and max_length that never cuts through image tokens."""

from __future__ import annotations

import torch

from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.data.vision_sft import (
    IMAGE_INPUTS,
    VisionConversation,
    VisionSFTCollator,
    image_token_id,
    tokenize_vision_conversation,
    tokenize_vision_conversations,
)
from humanalign.losses.sft import sft_loss_sums


def conversations(p):
    return [
        VisionConversation([{"role": "user", "content": "<image>\nWhat colour is it?"},
                            {"role": "assistant", "content": "It is red."}], [p["red"]]),
        VisionConversation([{"role": "system", "content": "Be brief."},  # two turns, images before the text
                            {"role": "user", "content": "Colours?"}, {"role": "assistant", "content": "Red, blue."},
                            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
                           [p["red"], p["blue"]]),
        VisionConversation([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
    ]


def decoded_labels(processor, example) -> list[str]:
    """The labelled spans, decoded (one string per run of labelled tokens)."""
    labels = example["labels"].tolist()
    spans, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX and current:
            spans.append(processor.tokenizer.decode(current))
            current = []
        elif label != IGNORE_INDEX:
            current.append(label)
    return spans


def test_labels_are_the_assistant_turns_only(family, pictures):
    name, _, processor = family
    examples, skipped, _ = tokenize_vision_conversations(conversations(pictures), processor, 512)
    assert not skipped and len(examples) == 3
    image_id = image_token_id(processor)
    for example in examples:
        assert len(example["labels"]) == len(example["input_ids"]) == len(example["attention_mask"])
        assert not (example["labels"] == image_id).any()  # image tokens never carry loss
    spans = [[s.replace(" ", "") for s in decoded_labels(processor, e)] for e in examples]
    assert spans[0] == ["Itisred.<|im_end|>"]
    assert spans[1] == ["Red,blue.<|im_end|>", "Yes.<|im_end|>"]  # both assistant turns
    assert spans[2] == ["Hi!<|im_end|>"]
    assert int((examples[1]["input_ids"] == image_id).sum()) > int((examples[0]["input_ids"] == image_id).sum()) > 0
    assert "pixel_values" in examples[0][IMAGE_INPUTS] and not examples[2][IMAGE_INPUTS]
    if name == "qwen2_vl":
        assert examples[1][IMAGE_INPUTS]["image_grid_thw"].shape[0] == 2


def test_batched_loss_is_each_row_alone_and_the_picture_matters(family, pictures):
    _, model, processor = family
    examples, _, _ = tokenize_vision_conversations(conversations(pictures), processor, 512)
    collate = VisionSFTCollator(processor.tokenizer.pad_token_id)
    batch = collate(examples)
    n_images = 3
    assert batch["input_ids"].shape[0] == 3
    if "image_grid_thw" in batch:
        assert batch["image_grid_thw"].shape[0] == n_images
    else:
        assert batch["pixel_values"].shape[0] == n_images

    def loss_sums(b):
        labels = b.pop("labels")
        with torch.no_grad():
            return sft_loss_sums(model(**b, use_cache=False).logits, labels)[0]

    together = loss_sums(dict(batch))
    alone = torch.cat([loss_sums(collate([e])) for e in examples])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    swapped = VisionConversation(conversations(pictures)[0].messages, [pictures["blue"]])
    other = tokenize_vision_conversation(swapped, processor, 512)
    assert (loss_sums(collate([other])) - alone[0]).abs() > 1e-6


def test_max_length_never_cuts_image_tokens(family, pictures):
    _, _, processor = family
    first = conversations(pictures)[0]
    full = tokenize_vision_conversation(first, processor, 512)
    image_id = image_token_id(processor)
    last_image = int((full["input_ids"] == image_id).nonzero()[-1])
    cut = tokenize_vision_conversation(first, processor, len(full["input_ids"]) - 2)
    assert len(cut["input_ids"]) == len(full["input_ids"]) - 2  # the answer's end is cut, the images stay
    assert tokenize_vision_conversation(first, processor, last_image) == "image tokens beyond max_length"
    prompt_end = int((full["labels"] != IGNORE_INDEX).nonzero()[0])
    if prompt_end > last_image + 1:
        assert tokenize_vision_conversation(first, processor, prompt_end).startswith("no assistant token left")
