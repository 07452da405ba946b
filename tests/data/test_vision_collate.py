"""Image-aware tokenisation and collation of preference pairs, on the tiny LLaVA and the tiny Qwen2-VL: labels on
the answers only, images shared by chosen and rejected, padding that does not change any sequence's log-prob,
and a picture that changes them."""

from __future__ import annotations

import pytest
import torch

from humanalign.data.records import PreferencePair, user_prompt
from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.data.vision_collate import VisionPairCollator, content_parts, tokenize_vision_pairs
from humanalign.models.logprobs import sequence_logps


def make_pairs(p):
    return [
        PreferencePair(user_prompt("<image>\nWhat colour is the shape?"), "It is red.", "It is blue, I think.",
                       images=[p["red"]]),
        PreferencePair(user_prompt("Which is darker, the first or the second?"), "The second one.", "First.",
                       images=[p["green"], p["blue"]]),  # no placeholders: both images before the text
        PreferencePair(user_prompt("Say hi."), "Hi!", "No."),  # text only, in the same batch
    ]


def test_content_parts_follow_the_placeholders():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A <image> then <image>."}]
    assert content_parts(msgs, 2)[1]["content"] == [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " then "}, {"type": "image"},
        {"type": "text", "text": "."}]
    assert content_parts([{"role": "user", "content": "Colour?"}], 1)[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "\nColour?"}]
    with pytest.raises(ValueError, match="1 '<image>' placeholders for 2 images"):
        content_parts([{"role": "user", "content": "<image>?"}], 2)


def image_token_id(name, model):
    return model.config.image_token_index if name == "llava" else model.config.image_token_id


def test_batch_layout(family, pictures):
    name, model, processor = family
    pairs = make_pairs(pictures)
    examples, skipped = tokenize_vision_pairs(pairs, processor)
    assert not skipped and len(examples) == 3
    batch = VisionPairCollator(processor.tokenizer.pad_token_id)(examples)
    rows = batch["input_ids"].shape[0]
    assert rows == 6 and batch["labels"].shape == batch["attention_mask"].shape == batch["input_ids"].shape
    per_image = 16 if name == "llava" else 4
    tokens = (batch["input_ids"] == image_token_id(name, model)).sum(-1).tolist()
    assert tokens == [per_image, 2 * per_image, 0] * 2  # chosen rows, then rejected rows with the same images
    if name == "llava":
        assert batch["pixel_values"].shape == (6, 3, 32, 32)  # 3 images per half, in row order
    else:
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 6 and batch["pixel_values"].shape[0] == 6 * 16
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    tok = processor.tokenizer
    for i, example in enumerate(examples):
        for row, answer in ((i, pairs[i].chosen), (i + 3, pairs[i].rejected)):
            labels = batch["labels"][row]
            assert (labels[: example.prompt_length] == IGNORE_INDEX).all()  # no loss on the prompt or its images
            assert tok.decode(labels[labels != IGNORE_INDEX]) == answer + "<|im_end|>"
        shared = example.prompt_length
        assert torch.equal(batch["input_ids"][i, :shared], batch["input_ids"][i + 3, :shared])


def logps(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return sequence_logps(logits, batch["labels"])[0]


def test_padding_leaves_each_sequence_alone_and_the_picture_matters(family, pictures):
    name, model, processor = family
    pairs = make_pairs(pictures)
    collate = VisionPairCollator(processor.tokenizer.pad_token_id)
    examples, _ = tokenize_vision_pairs(pairs, processor)
    together = logps(model, collate(examples))  # (6,)
    assert torch.isfinite(together).all() and (together < 0).all()
    alone = torch.stack([logps(model, collate([e])) for e in examples], dim=1).flatten()  # chosen..., rejected...
    assert torch.allclose(together, alone, atol=1e-4)

    swapped = [PreferencePair(p.prompt, p.chosen, p.rejected, images=[pictures["blue"]] * len(p.images))
               for p in pairs]
    other = logps(model, collate(tokenize_vision_pairs(swapped, processor)[0]))
    changed = (other - together).abs()
    assert (changed[[0, 1, 3, 4]] > 1e-5).all()  # the pairs with a picture (the blue-on-blue one too: red -> blue)
    assert torch.allclose(other[[2, 5]], together[[2, 5]], atol=1e-5)  # the text-only pair is untouched


def test_max_length_cuts_answers_never_prompts(family, pictures):
    _, _, processor = family
    pair = make_pairs(pictures)[0]
    (full,), _ = tokenize_vision_pairs([pair], processor)
    limit = full.prompt_length + 2
    (cut,), _ = tokenize_vision_pairs([pair], processor, max_length=limit)
    assert len(cut.chosen["input_ids"]) == limit and (cut.chosen["labels"] != IGNORE_INDEX).sum() == 2
    examples, skipped = tokenize_vision_pairs([pair], processor, max_length=full.prompt_length)
    assert examples == [] and skipped == {"prompt longer than max_length": 1}


def test_prepared_image_demo_feeds_the_saved_tiny_llava(tmp_path, cli, colour_corpus):
    """The whole path: generated pictures -> prepare-data -> prepared pairs -> the saved tiny LLaVA folder
    (Auto classes) -> collated batch -> finite log-probs, each row showing its own picture."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from humanalign.config.data import SourceSpec
    from humanalign.data.image_demo import write_image_demo
    from humanalign.data.load import load_source
    from humanalign.models.tiny_vision import build_tiny_vision_model

    raw = write_image_demo(tmp_path / "raw", n=16, seed=0)
    code, _, err = cli("prepare-data", "--input-dir", raw, "--output-dir", tmp_path / "data",
                       "--train-ratio", "1", "--val-ratio", "0", "--test-ratio", "0")
    assert code == 0, err
    pairs = load_source(SourceSpec(path=str(tmp_path / "data" / "train" / "helpful_pairs.jsonl"))).records
    assert len(pairs) >= 12 and all(len(p.images) == 1 for p in pairs)
    folder = build_tiny_vision_model(tmp_path / "vlm", texts=colour_corpus, vocab_size=400)
    model, processor = AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
    examples, skipped = tokenize_vision_pairs(pairs[:4], processor, max_length=128)
    assert not skipped
    batch = VisionPairCollator(processor.tokenizer.pad_token_id)(examples)
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    values = logps(model.eval(), batch)
    assert values.shape == (8,) and torch.isfinite(values).all()
    # rows 0 and 4 are pair 0's chosen and rejected: the same picture, pixel for pixel
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][4])


def test_a_processor_without_chat_template_is_a_clear_error(family, pictures):
    from humanalign.errors import UserError

    _, _, processor = family
    template, processor.chat_template = processor.chat_template, None
    try:
        with pytest.raises(UserError, match="has no chat template"):
            tokenize_vision_pairs(make_pairs(pictures)[:1], processor)
    finally:
        processor.chat_template = template
