"""Batched generation: determinism, left padding, and resuming an interrupted run without duplicates."""

from __future__ import annotations

import json

import pytest

from humanalign.data.prompts import prompt_hash
from humanalign.errors import RecordError, UserError
from humanalign.eval.generate import (
    Sampling,
    generate_responses,
    generate_to_file,
    load_done,
)

PROMPTS = [
    "How do I bake bread?",
    "Tell me a story about a cat.",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    "Why is the sky blue? Explain it to a child in a few short sentences please.",
    "hi",
    "List three fruits.",
]
SAMPLING = Sampling(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, seed=3)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from humanalign.models.tiny import tiny_model_path

    path = tiny_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _messages():
    from humanalign.data.records import prompt_from_jsonable

    return [prompt_from_jsonable(p) for p in PROMPTS]


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_answers_and_padding_does_not_change_greedy(tiny):
    import torch

    model, tok = tiny
    torch.manual_seed(0)
    caller_state = torch.get_rng_state()
    a = generate_responses(model, tok, PROMPTS, batch_size=3, num_return_sequences=2, max_new_tokens=8, seed=5,
                           temperature=1.0, top_p=1.0)
    b = generate_responses(model, tok, PROMPTS, batch_size=3, num_return_sequences=2, max_new_tokens=8, seed=5,
                           temperature=1.0, top_p=1.0)
    c = generate_responses(model, tok, PROMPTS, batch_size=3, num_return_sequences=2, max_new_tokens=8, seed=6,
                           temperature=1.0, top_p=1.0)
    assert len(a) == 12 and a == b  # 6 prompts x 2 samples, prompt-major
    assert torch.equal(torch.get_rng_state(), caller_state)  # the caller's random stream is left alone
    assert a != c  # a random-init model at temperature 1 is close to uniform over ~2k tokens: seeds differ
    # Greedy answers of a prompt alone and left-padded in a batch of longer prompts are the same tokens.
    alone = generate_responses(model, tok, PROMPTS, batch_size=1, do_sample=False, max_new_tokens=8)
    batched = generate_responses(model, tok, PROMPTS, batch_size=6, do_sample=False, max_new_tokens=8)
    assert alone == batched


def test_resume_after_a_kill_writes_each_prompt_once_and_matches_a_full_run(tiny, tmp_path):
    model, tok = tiny
    prompts = _messages()
    full = tmp_path / "full.jsonl"
    stats = generate_to_file(model, tok, prompts, full, "tiny", SAMPLING, num_return_sequences=2, batch_size=2,
                             progress=False)
    assert stats == {"prompts": 6, "samples_total": 12, "samples_skipped": 0, "samples_written": 12}
    reference = _lines(full)

    # A kill after the first batch (2 prompts x 2 samples = 4 lines) ...
    killed = tmp_path / "killed.jsonl"

    def stop_after_first_batch(written: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_to_file(model, tok, prompts, killed, "tiny", SAMPLING, num_return_sequences=2, batch_size=2,
                         progress=False, on_batch=stop_after_first_batch)
    assert len(_lines(killed)) == 4
    # ... and a line cut in half by the kill.
    with open(killed, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(reference[4])[:40])
    stats = generate_to_file(model, tok, prompts, killed, "tiny", SAMPLING, num_return_sequences=2, batch_size=2,
                             progress=False)
    assert stats["samples_skipped"] == 4 and stats["samples_written"] == 8
    resumed = _lines(killed)
    keys = [(r["prompt_hash"], r["sample_index"]) for r in resumed]
    assert len(keys) == 12 and len(set(keys)) == 12  # every (prompt, sample) once, no broken line left
    # Batches are seeded by their prompts, so the resumed run wrote what the uninterrupted one did.
    assert resumed == reference
    assert {r["model"] for r in resumed} == {"tiny"}

    # Running again finds everything done.
    again = generate_to_file(model, tok, prompts, killed, "tiny", SAMPLING, num_return_sequences=2, progress=False)
    assert again["samples_written"] == 0 and again["samples_skipped"] == 12


def test_partial_prompt_gets_only_its_missing_samples(tiny, tmp_path):
    model, tok = tiny
    prompts = _messages()[:2]
    out = tmp_path / "gen.jsonl"
    generate_to_file(model, tok, prompts, out, "tiny", SAMPLING, num_return_sequences=1, progress=False)
    assert len(_lines(out)) == 2
    # Asking for 3 samples later adds samples 1 and 2 of each prompt: 2 x 2 = 4 new lines.
    stats = generate_to_file(model, tok, prompts, out, "tiny", SAMPLING, num_return_sequences=3, progress=False)
    assert stats["samples_written"] == 4
    keys = sorted((r["prompt_hash"], r["sample_index"]) for r in _lines(out))
    assert keys == sorted((prompt_hash(p), s) for p in prompts for s in range(3))


def test_resume_refuses_other_settings_or_model(tiny, tmp_path):
    model, tok = tiny
    prompts = _messages()[:1]
    out = tmp_path / "gen.jsonl"
    generate_to_file(model, tok, prompts, out, "tiny", SAMPLING, progress=False)
    hotter = Sampling(**{**SAMPLING.__dict__, "temperature": 1.5})
    with pytest.raises(UserError, match="temperature 1.0 -> 1.5"):
        generate_to_file(model, tok, prompts, out, "tiny", hotter, progress=False)
    with pytest.raises(UserError, match="other settings"):
        generate_to_file(model, tok, prompts, out, "other-model", SAMPLING, progress=False)
    stats = generate_to_file(model, tok, prompts, out, "tiny", hotter, overwrite=True, progress=False)
    assert stats["samples_written"] == 1 and len(_lines(out)) == 1


def test_corrupt_middle_line_is_an_error(tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text('{"prompt": "a", "response": "x", "sample_index": 0}\nnot json\n{"prompt": "b"}\n')
    with pytest.raises(RecordError, match=":2:"):
        load_done(out)


def test_cli_generate_writes_jsonl_and_resumes(tmp_path):
    pytest.importorskip("humanalign.models.load")
    from humanalign.cli import main
    from humanalign.models.tiny import tiny_model_path

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(tiny_model_path()), "--prompts", str(prompts), "--output", str(out),
            "--max-new-tokens", "4", "--batch-size", "2", "--num-return-sequences", "2", "--progress-bar", "false"]
    assert main(args) == 0
    rows = _lines(out)
    assert len(rows) == 6 and {r["sample_index"] for r in rows} == {0, 1}
    assert set(rows[0]) >= {"prompt", "response", "model", "sample_index"}
    assert main(args) == 0 and len(_lines(out)) == 6  # a second run has nothing to do
