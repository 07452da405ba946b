"""Generation with a vision-language model (the tiny LLaVA folder and the in-memory tiny Qwen2-VL): greedy answers
the same alone and batched (left padding inert), the picture changing the next-token distribution, several answers
per prompt keeping each prompt's pictures in order, the image references written beside the answers, and the
`generate` / `eval arena` / `distill` commands end to end on an image prompt file, with the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from humanalign.cli import main
from humanalign.config.data import SourceSpec
from humanalign.data.load import load_source
from humanalign.data.prompts import prompt_hash
from humanalign.data.records import PromptRecord, SFTRecord, user_prompt
from humanalign.errors import UserError
from humanalign.eval.generate import (
    Sampling,
    generate_image_token_ids,
    generate_responses,
    generate_to_file,
    load_done,
)
from humanalign.eval.vision_generate import vision_generation_inputs
from humanalign.models.tiny_vision import build_tiny_vision_model, tiny_llava, tiny_qwen2_vl

RED, BLUE, GREEN = (220, 40, 40), (40, 80, 220), (40, 200, 40)
GREEDY = Sampling(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def pics(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vision_generate")
    for name, colour in (("red", RED), ("blue", BLUE), ("green", GREEN)):
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def family(request):
    model, processor = (tiny_llava if request.param == "llava" else tiny_qwen2_vl)(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory) -> Path:
    return build_tiny_vision_model(tmp_path_factory.mktemp("tiny_llava") / "model", seed=0)


def records(pics: Path) -> list[PromptRecord]:
    """Prompts of different lengths: one picture, none, two with placeholders and a system turn, another one."""
    return [
        PromptRecord(user_prompt("What colour is the square?"), images=[str(pics / "red.png")]),
        PromptRecord(user_prompt("Hi")),
        PromptRecord([{"role": "system", "content": "Answer in one long careful sentence please."},
                      {"role": "user", "content": "Is <image> the same colour as <image>?"}],
                     images=[str(pics / "red.png"), str(pics / "blue.png")]),
        PromptRecord(user_prompt("What colour is the square?"), images=[str(pics / "blue.png")]),
    ]


def next_token_logits(model, processor, prompts: list[PromptRecord], n: int = 1) -> torch.Tensor:
    """(rows, vocab) logits of the first answer token of each row of one left-padded generation batch."""
    batch = vision_generation_inputs(processor, [r.prompt for r in prompts], [r.images for r in prompts], 512,
                                     processor.tokenizer.pad_token_id, n)
    with torch.inference_mode():
        return model(**batch.inputs).logits[:, -1].float()


def test_greedy_answers_and_logits_are_the_same_alone_and_batched(family, pics):
    model, processor = family
    prompts = records(pics)
    alone = [generate_image_token_ids(model, processor, [r], GREEDY)[0] for r in prompts]
    batched = generate_image_token_ids(model, processor, prompts, GREEDY)
    assert batched == alone and generate_image_token_ids(model, processor, prompts, GREEDY) == batched
    assert all(len(a) > 0 for a in alone)
    single = torch.cat([next_token_logits(model, processor, [r]) for r in prompts])
    torch.testing.assert_close(next_token_logits(model, processor, prompts), single, atol=1e-4, rtol=1e-4)


def test_the_picture_changes_the_next_token_distribution(family, pics):
    model, processor = family
    red, _, _, blue = records(pics)
    logits = next_token_logits(model, processor, [red, blue])  # the same text, another picture
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    green = PromptRecord(red.prompt, images=[str(pics / "green.png")])
    assert (next_token_logits(model, processor, [green])[0] - logits[0]).abs().max() > 1e-3


def test_several_answers_per_prompt_keep_each_prompts_pictures_in_order(family, pics):
    """Rows are repeated with their own pictures: a two-picture prompt's repeats are that prompt exactly."""
    model, processor = family
    prompts = records(pics)
    single = torch.cat([next_token_logits(model, processor, [r]) for r in prompts])
    repeated = next_token_logits(model, processor, prompts, n=2)  # prompt-major: p0, p0, p1, p1, ...
    torch.testing.assert_close(repeated, single.repeat_interleave(2, dim=0), atol=1e-4, rtol=1e-4)
    greedy = generate_image_token_ids(model, processor, prompts, GREEDY, num_return_sequences=2)
    assert greedy == [a for a in generate_image_token_ids(model, processor, prompts, GREEDY) for _ in range(2)]


def test_sampling_is_seeded_per_batch(family, pics):
    model, processor = family
    prompts = records(pics)
    kwargs = dict(num_return_sequences=2, batch_size=4, max_new_tokens=6, temperature=1.0, top_p=1.0)
    a = generate_responses(model, processor, prompts, seed=1, **kwargs)
    assert len(a) == 8 and a == generate_responses(model, processor, prompts, seed=1, **kwargs)
    assert a != generate_responses(model, processor, prompts, seed=2, **kwargs)


def test_long_prompts_with_images_are_kept_whole_and_text_ones_cut(pics):
    _, processor = tiny_qwen2_vl(seed=0)
    prompts = records(pics)
    full = vision_generation_inputs(processor, [r.prompt for r in prompts], [r.images for r in prompts], 512, 0)
    lengths = full.inputs["attention_mask"].sum(dim=1).tolist()
    cut = vision_generation_inputs(processor, [r.prompt for r in prompts], [r.images for r in prompts], 5, 0)
    assert (cut.long_image_prompts, cut.prompt_truncated) == (3, 1)
    kept = cut.inputs["attention_mask"].sum(dim=1).tolist()
    assert kept == [lengths[0], 5, lengths[2], lengths[3]]  # "Hi" lost its beginning, the image prompts nothing
    torch.testing.assert_close(cut.inputs["pixel_values"], full.inputs["pixel_values"])


def test_a_text_tokenizer_refuses_image_prompts(pics):
    from transformers import AutoTokenizer

    from humanalign.models.tiny import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path())
    with pytest.raises(UserError, match="1 of 2 prompts show images, which a text-only model cannot see"):
        generate_responses(None, tokenizer, records(pics)[:2], max_new_tokens=2)


def test_answers_carry_the_image_references_and_resume_by_picture(pics, tmp_path):
    model, processor = tiny_qwen2_vl(seed=0)
    prompts = records(pics)
    out = tmp_path / "answers.jsonl"
    stats = generate_to_file(model, processor, prompts, out, "qwen", GREEDY, progress=False)
    assert stats["samples_written"] == 4
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r.get("images") for r in rows] == [p.images or None for p in prompts]
    assert [r["prompt_hash"] for r in rows] == [prompt_hash(p.prompt, p.images) for p in prompts]
    assert rows[0]["prompt"] == rows[3]["prompt"] and rows[0]["prompt_hash"] != rows[3]["prompt_hash"]
    assert set(load_done(out)) == {(r["prompt_hash"], 0) for r in rows}
    again = generate_to_file(None, None, prompts, out, "qwen", GREEDY, progress=False,
                             loader=lambda: pytest.fail("nothing left to generate: no model is loaded"))
    assert again["samples_skipped"] == 4 and again["samples_written"] == 0


# ------------------------------------------------------------------------------------------------- commands


def prompt_file(pics: Path) -> Path:
    rows = [{"prompt": "<image>What colour is the square?", "images": ["red.png"]},
            {"query": "What colour is the square?", "images": ["blue.png"]},  # ms-swift style
            {"question": "Which colour?", "image": "green.png"},  # RLAIF-V style
            {"prompt": "Say hello."}]
    path = pics / "image_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


SAMPLED = ["--max-new-tokens", "5", "--temperature", "1.0", "--top-p", "1.0", "--progress-bar", "false"]


def test_generate_command_writes_image_references_beside_the_answers(llava_folder, pics, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--model", str(llava_folder), "--prompts", str(prompt_file(pics)), "--output", str(out),
                 "--batch-size", "3", *SAMPLED]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r.get("images") for r in rows] == [[str(pics / "red.png")], [str(pics / "blue.png")],
                                               [str(pics / "green.png")], None]
    assert all(r["model"] == str(llava_folder) and r["response"] for r in rows)


def test_a_text_model_or_a_missing_picture_stops_generate_with_one_line(pics, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    capsys.readouterr()
    assert main(["generate", "--model", "tiny", "--prompts", str(prompt_file(pics)), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image_prompts.jsonl: 3 of 4 prompts show images, but the model 'tiny' is a " \
        "text-only model" in err[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi"}\n{"prompt": "<image>Colour?", "images": ["gone.png"]}\n', encoding="utf-8")
    assert main(["generate", "--model", "tiny", "--prompts", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2: field 'images[0]': image 'gone.png' not found" in err[0]
    assert not out.exists()


class LengthJudge:
    """Scores answers by their length: the numbers follow from the saved answers alone."""

    def __init__(self, kind: str):
        self.kind = kind

    def score(self, prompts, responses, batch_size=None):
        return [float(len(r)) if self.kind == "reward" else -1.0 for r in responses]


def test_arena_with_image_prompts_and_vision_models_on_both_sides(llava_folder, pics, tmp_path, monkeypatch,
                                                                   capsys):
    import humanalign.models.scorer as scorer_module

    monkeypatch.setattr(scorer_module, "load_scorer", lambda model_dir, **kw: LengthJudge(model_dir))
    monkeypatch.setattr("humanalign.eval.arena._free_memory", lambda: None)  # a full gc per model: seconds here
    out = tmp_path / "arena"
    args = ["eval", "arena", "--red", str(llava_folder), "--blue", str(llava_folder), "--reward-model", "reward",
            "--cost-model", "cost", "--prompts", str(prompt_file(pics)), "--output-dir", str(out), *SAMPLED]
    capsys.readouterr()
    assert main(args) == 0
    assert "3 of 4 prompts show images; the reward and cost models read text only" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [len(r.get("images", [])) for r in rows] == [1, 1, 1, 0]
    assert all(r["red_reward"] == len(r["red_response"]) for r in rows)
    stats = json.loads((out / "arena.json").read_text(encoding="utf-8"))
    assert stats["prompts"]["with_images"] == 3 and stats["judges_see_images"] is False
    assert "read text only" in (out / "arena.md").read_text(encoding="utf-8")

    # A text-only side is refused before anything is generated.
    args[args.index("--blue") + 1] = "tiny"
    assert main([*args, "--output-dir", str(tmp_path / "arena2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "but the blue model 'tiny' is a text-only model" in err[0]
    assert not (tmp_path / "arena2").exists()


def test_distill_keeps_the_pictures_with_the_answers(llava_folder, pics, tmp_path, capsys):
    out = tmp_path / "distilled.jsonl"
    assert main(["distill", "--model", str(llava_folder), "--prompts", str(prompt_file(pics)), "--output",
                 str(out), "--num-samples", "2", *SAMPLED]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {tuple(r.get("images", [])) for r in rows} <= {(str(pics / f"{c}.png"),) for c in ("red", "blue", "green")} \
        | {()}
    assert any(r.get("images") for r in rows)
    # The kept rows read back as SFT conversations with their pictures.
    back = load_source(SourceSpec(path=str(out))).records
    assert all(isinstance(r, SFTRecord) for r in back)
    assert [r.images for r in back] == [r.get("images", []) for r in rows]
    capsys.readouterr()
    assert main(["distill", "--model", "tiny", "--prompts", str(prompt_file(pics)), "--output",
                 str(tmp_path / "d2.jsonl")]) == 2
    assert "but the model 'tiny' is a text-only model" in capsys.readouterr().err


def test_arena_with_text_prompts_takes_a_vision_model_on_one_side(llava_folder, tmp_path, monkeypatch):
    import humanalign.models.scorer as scorer_module

    monkeypatch.setattr(scorer_module, "load_scorer", lambda model_dir, **kw: LengthJudge(model_dir))
    monkeypatch.setattr("humanalign.eval.arena._free_memory", lambda: None)  # a full gc per model: seconds here
    prompts = tmp_path / "text.jsonl"
    prompts.write_text('{"prompt": "Say hello."}\n{"prompt": "Name a colour."}\n', encoding="utf-8")
    out = tmp_path / "arena"
    assert main(["eval", "arena", "--red", "tiny", "--blue", str(llava_folder), "--reward-model", "reward",
                 "--cost-model", "cost", "--prompts", str(prompts), "--output-dir", str(out), *SAMPLED]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and not any("images" in r for r in rows)
    stats = json.loads((out / "arena.json").read_text(encoding="utf-8"))
    assert stats["prompts"]["with_images"] == 0 and "judges_see_images" not in stats
    blue = [json.loads(line) for line in (out / "blue.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt_hash"] for r in blue] == [prompt_hash(user_prompt(t)) for t in ("Say hello.", "Name a colour.")]
