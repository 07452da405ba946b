"""More vision-language families (models.tiny_vision_families): Idefics3 and SmolVLM (tiles, 5-D pixel values with
a pixel_attention_mask) and Qwen2.5-VL (window attention, image_grid_thw). For each: the parts are found (tower,
projector, language model), a pair's and a conversation's log-probs are the same batched with a partner of another
length and image count as alone, the picture changes them, and one DPO and one SFT step train the language model
and the projector, never the frozen tower."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from humanalign.config.base import load_config
from humanalign.config.dpo import DPOConfig
from humanalign.data.records import PreferencePair, user_prompt
from humanalign.data.tokenize import IGNORE_INDEX
from humanalign.data.vision_collate import VisionPairCollator, batch_image_inputs, tokenize_vision_pairs
from humanalign.data.vision_sft import VisionConversation, VisionSFTCollator, tokenize_vision_conversations
from humanalign.losses.sft import sft_loss_sums
from humanalign.models.logprobs import pair_layout, sequence_logps
from humanalign.models.reference import FrozenReference
from humanalign.models.tiny_vision_families import tiny_idefics3, tiny_qwen2_5_vl, tiny_smolvlm
from humanalign.models.vision import model_part, set_trainable_parts
from humanalign.trainers.dpo import LossSettings, pair_loss
from humanalign.trainers.sft import forward_logits

CORPUS = [f"User {i} asks what colour the {shape} is. The assistant says it is {colour}."
          for i in range(30) for shape in ("circle", "square") for colour in ("red", "blue", "green")]
BUILDERS = {"idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm, "qwen2_5_vl": tiny_qwen2_5_vl}
# the modules each family's parts live in
PARTS = {"idefics3": ("model.vision_model.", "model.connector.", "model.text_model."),
         "smolvlm": ("model.vision_model.", "model.connector.", "model.text_model."),
         "qwen2_5_vl": ("model.visual.blocks.", "model.visual.merger.", "model.language_model.")}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    model, processor = BUILDERS[request.param](CORPUS, vocab_size=400)
    return request.param, model.eval(), processor


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pics")
    paths = {}
    for name, colour, size in (("red", (220, 40, 40), (56, 56)), ("blue", (40, 80, 220), (56, 56)),
                               ("wide", (40, 170, 60), (56, 28))):  # wide: fewer tiles, a padded global view
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
        paths[name] = str(folder / f"{name}.png")
    return paths


def make_pairs(p):
    return [
        PreferencePair(user_prompt("<image>\nWhat colour is the shape?"), "It is red.", "It is blue, I think.",
                       images=[p["red"]]),
        PreferencePair(user_prompt("Which is darker, the first or the second?"), "The second one.", "First.",
                       images=[p["wide"], p["blue"]]),  # two images, of different tile counts
        PreferencePair(user_prompt("Say hi."), "Hi!", "No."),  # text only, in the same batch
    ]


def logps(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return sequence_logps(logits, batch["labels"])[0]


def part_grads(model) -> dict[str, float]:
    grads = {"vision": 0.0, "projector": 0.0, "language": 0.0}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grads[model_part(name)] += float(param.grad.abs().sum())
    return grads


def test_the_parts_are_found(family):
    name, model, _ = family
    tower, projector, language = PARTS[name]
    parts = {n: model_part(n) for n, _ in model.named_parameters()}
    assert {n for n, p in parts.items() if p == "vision"} == {n for n in parts if n.startswith(tower)} | (
        {n for n in parts if n.startswith("model.visual.patch_embed.")} if name == "qwen2_5_vl" else set())
    assert {n for n, p in parts.items() if p == "projector"} == {n for n in parts if n.startswith(projector)}
    assert all(parts[n] == "language" for n in parts if n.startswith(language))


def test_pair_batch_layout(family, pictures):
    name, model, processor = family
    examples, skipped = tokenize_vision_pairs(make_pairs(pictures), processor)
    assert not skipped
    batch = VisionPairCollator(processor.tokenizer.pad_token_id)(examples)
    image_id = model.config.image_token_id
    tokens = (batch["input_ids"] == image_id).sum(-1).tolist()
    if name == "qwen2_5_vl":
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 12], [1, 8, 8]] * 2
        assert tokens == [16, 18 + 16, 0] * 2
        return
    # a 56-px square: 2 x 2 tiles + the global view; the wide one 1 x 2 + global; 4 tokens a tile
    assert batch["pixel_values"].shape == (6, 8, 3, 32, 32) and batch["pixel_attention_mask"].shape == (6, 8, 32, 32)
    assert tokens == [5 * 4, (3 + 5) * 4, 0] * 2
    real = (batch["pixel_values"] != 0).flatten(2).any(-1)  # (rows, tiles): which tiles are real
    assert real.sum(-1).tolist() == [5, 8, 0] * 2
    assert torch.equal(batch["pixel_values"][:3], batch["pixel_values"][3:])  # rejected rows: the same images
    mask = batch["pixel_attention_mask"]
    assert torch.equal(mask.flatten(2).sum(-1), real.long() * 32 * 32)  # real tiles all real, padding none


def test_padding_is_inert_and_the_picture_matters(family, pictures):
    _, model, processor = family
    pairs = make_pairs(pictures)
    collate = VisionPairCollator(processor.tokenizer.pad_token_id)
    examples, _ = tokenize_vision_pairs(pairs, processor)
    together = logps(model, collate(examples))  # (6,) chosen..., rejected...
    assert torch.isfinite(together).all() and (together < 0).all()
    alone = torch.stack([logps(model, collate([e])) for e in examples], dim=1).flatten()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    swapped = [PreferencePair(p.prompt, p.chosen, p.rejected, images=[pictures["blue"]] * len(p.images))
               for p in pairs]
    other = logps(model, collate(tokenize_vision_pairs(swapped, processor)[0]))
    assert ((other - together).abs()[[0, 3]] > 1e-5).all()  # red -> blue changes pair 0
    torch.testing.assert_close(other[[2, 5]], together[[2, 5]], atol=1e-5, rtol=0)  # text-only: untouched


def conversations(p):
    return [
        VisionConversation([{"role": "user", "content": "<image>\nWhat colour is it?"},
                            {"role": "assistant", "content": "It is red."}], [p["red"]]),
        VisionConversation([{"role": "user", "content": "Colours?"}, {"role": "assistant", "content": "Green, blue."},
                            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
                           [p["wide"], p["blue"]]),
        VisionConversation([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]),
    ]


def test_sft_padding_is_inert(family, pictures):
    _, model, processor = family
    examples, skipped, _ = tokenize_vision_conversations(conversations(pictures), processor, 512)
    assert not skipped
    collate = VisionSFTCollator(processor.tokenizer.pad_token_id)
    with torch.no_grad():
        together, counts = sft_loss_sums(forward_logits(model, collate(examples), vision=True),
                                         collate(examples)["labels"])
        alone = torch.cat([sft_loss_sums(forward_logits(model, collate([e]), vision=True), e["labels"][None])[0]
                           for e in examples])
    assert counts.tolist() == [int((e["labels"] != IGNORE_INDEX).sum()) for e in examples]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_a_dpo_step_trains_the_language_model_and_projector(family, pictures):
    _, model, processor = family
    policy = copy.deepcopy(model).train()
    reference = FrozenReference(copy.deepcopy(model).requires_grad_(False))
    counts = set_trainable_parts(policy, freeze_vision_tower=True, freeze_projector=False)
    assert counts["vision"] == 0 and counts["projector"] > 0 and counts["language"] > 0
    examples, _ = tokenize_vision_pairs(make_pairs(pictures), processor)
    batch = VisionPairCollator(processor.tokenizer.pad_token_id)(examples)
    assert pair_layout(policy, batch) == "plain"
    settings = LossSettings.from_config(load_config(DPOConfig, values={}))
    step = pair_loss(policy, reference, batch, settings, 0.1)
    assert step.loss.item() == pytest.approx(0.6931, abs=1e-3)  # policy = reference: -log sigmoid(0)
    step.loss.backward()
    grads = part_grads(policy)
    assert grads["vision"] == 0 and grads["projector"] > 0 and grads["language"] > 0


def test_an_sft_step_trains_the_language_model_and_projector(family, pictures):
    _, model, processor = family
    policy = copy.deepcopy(model).train()
    set_trainable_parts(policy, freeze_vision_tower=True, freeze_projector=False)
    examples, _, _ = tokenize_vision_conversations(conversations(pictures), processor, 512)
    batch = VisionSFTCollator(processor.tokenizer.pad_token_id)(examples)
    sums, counts = sft_loss_sums(forward_logits(policy, batch, vision=True), batch["labels"])
    loss = sums.sum() / counts.sum()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = part_grads(policy)
    assert grads["vision"] == 0 and grads["projector"] > 0 and grads["language"] > 0


def test_batch_image_inputs_pads_tiles_and_pixels():
    """Rows of 2 and 1 tiles of different sizes and a row without images -> (3, 2, C, 4, 4), zeros elsewhere."""
    a = {"pixel_values": torch.ones(1, 2, 3, 4, 4), "pixel_attention_mask": torch.ones(1, 2, 4, 4, dtype=torch.long)}
    b = {"pixel_values": torch.full((1, 1, 3, 4, 2), 2.0),
         "pixel_attention_mask": torch.ones(1, 1, 4, 2, dtype=torch.long)}
    out = batch_image_inputs([a, {}, b])
    assert out["pixel_values"].shape == (3, 2, 3, 4, 4) and out["pixel_attention_mask"].shape == (3, 2, 4, 4)
    assert out["pixel_values"].sum(dim=(1, 2, 3, 4)).tolist() == [96.0, 0.0, 48.0]
    assert out["pixel_attention_mask"][2, 0, :, :2].all() and not out["pixel_attention_mask"][2, 0, :, 2:].any()
    flat = batch_image_inputs([{"pixel_values": torch.ones(2, 5)}, {}, {"pixel_values": torch.zeros(3, 5)}])
    assert flat["pixel_values"].shape == (5, 5)  # the other families: concatenated in row order
