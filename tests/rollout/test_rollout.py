"""The rollout interface: batched KV-cache generation with the HF backend, and a scripted backend in the trainer.

The tiny preset (random weights, ~1.5k-token vocabulary) answers with near-uniform tokens, so answers rarely stop
on their own; tests that need a stop token force one with a custom stop set.
"""

from __future__ import annotations

import json

import pytest
import torch

from humanalign.data.tokenize import encode_prompt
from humanalign.models.load import load_causal_lm, load_tokenizer
from humanalign.rollout import GeneratedBatch, GenerationSettings, HFRolloutEngine, RolloutEngine
from humanalign.rollout.batch import RolloutBatch, response_logps

PROMPTS = ["How do I grow tomatoes?", "Tell me a joke.", "Name three colours please, and explain each of them."]


@pytest.fixture(scope="module")
def actor():
    torch.manual_seed(0)
    return load_causal_lm("tiny", trainable=False), load_tokenizer("tiny")


def _ids(tokenizer, prompts=PROMPTS):
    return [encode_prompt(tokenizer, [{"role": "user", "content": p}], 64) for p in prompts]


def test_prompt_major_order_and_lengths(actor):
    model, tokenizer = actor
    engine = HFRolloutEngine(model, tokenizer)
    ids = _ids(tokenizer)
    out = engine.generate(ids, GenerationSettings(max_new_tokens=6), num_return_sequences=2, seed=1)
    # 3 prompts x 2 answers, prompt-major: prompt 0 twice, then prompt 1 twice, then prompt 2 twice
    assert out.prompt_index == [0, 0, 1, 1, 2, 2]
    assert out.prompt_ids == [ids[0], ids[0], ids[1], ids[1], ids[2], ids[2]]
    assert len(out) == 6 and all(1 <= len(r) <= 6 for r in out.response_ids)
    for response, finished in zip(out.response_ids, out.finished):
        assert finished == (response[-1] in engine.stop_ids)
        assert not any(t in engine.stop_ids for t in response[:-1])  # nothing after a stop token
        if not finished:
            assert len(response) == 6  # cut at max_new_tokens
    assert out.response_tokens == sum(len(r) for r in out.response_ids)
    assert not model.training  # mode restored (it was eval)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(actor):
    model, tokenizer = actor
    engine = HFRolloutEngine(model, tokenizer)
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = engine.generate(_ids(tokenizer), settings, seed=7)
    after = torch.rand(1)
    b = engine.generate(_ids(tokenizer), settings, seed=7)
    c = engine.generate(_ids(tokenizer), settings, seed=8)
    assert a.response_ids == b.response_ids
    assert a.response_ids != c.response_ids  # 3 x 8 near-uniform tokens from 1.5k: equal by chance ~never
    assert torch.equal(before, after)  # generation used a forked RNG


def test_left_padded_batch_equals_one_by_one(actor):
    """The KV-cache batch (prompts of different lengths, left-padded) answers exactly as each prompt alone."""
    model, tokenizer = actor
    engine = HFRolloutEngine(model, tokenizer)
    greedy = GenerationSettings(max_new_tokens=10, do_sample=False)
    ids = _ids(tokenizer)
    assert len({len(i) for i in ids}) == 3  # really different lengths
    batched = engine.generate(ids, greedy)
    alone = [engine.generate([i], greedy).response_ids[0] for i in ids]
    assert batched.response_ids == alone


def test_training_layout_reproduces_the_greedy_choice(actor):
    """Right-padded [prompt | response] rows and the response-aligned positions pick the logits that generated
    each token: under greedy decoding every response token is the argmax there, and its log-prob matches."""
    model, tokenizer = actor
    out = HFRolloutEngine(model, tokenizer).generate(_ids(tokenizer), GenerationSettings(max_new_tokens=7,
                                                                                        do_sample=False))
    batch = RolloutBatch.from_generation(out.prompt_ids, out.response_ids, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (N, L, V)
        logps, entropy = response_logps(logits, batch, with_entropy=True)
    picked = logits.gather(1, batch.action_positions().unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (N, R, V)
    mask = batch.response_mask.bool()
    assert torch.equal(picked.argmax(-1)[mask], batch.response_ids[mask])
    expected = torch.log_softmax(picked.float(), -1).max(-1).values  # the greedy token's log-prob
    torch.testing.assert_close(logps[mask], expected[mask])
    assert (entropy[mask] > 0).all() and (entropy[~mask] == 0).all()
    assert (logps[~mask] == 0).all()


def test_stop_token_ends_and_is_kept(actor):
    """With every token a stop token, each answer is exactly one token, marked finished, with empty text."""
    model, tokenizer = actor
    everything = list(range(len(tokenizer)))
    out = HFRolloutEngine(model, tokenizer, stop_token_ids=everything).generate(
        _ids(tokenizer), GenerationSettings(max_new_tokens=5), seed=0)
    assert [len(r) for r in out.response_ids] == [1, 1, 1]
    assert out.finished == [True, True, True]
    assert out.texts == ["", "", ""]


def test_generation_batch_size_splits_prompts(actor):
    model, tokenizer = actor
    greedy = GenerationSettings(max_new_tokens=4, do_sample=False)
    whole = HFRolloutEngine(model, tokenizer).generate(_ids(tokenizer), greedy, num_return_sequences=2)
    split = HFRolloutEngine(model, tokenizer, batch_size=1).generate(_ids(tokenizer), greedy, num_return_sequences=2)
    assert split.response_ids == whole.response_ids and split.prompt_index == whole.prompt_index


class ScriptedEngine(RolloutEngine):
    """A backend that is not transformers: answers with fixed token lists, and counts weight syncs."""

    def __init__(self, tokenizer, answers: list[str]):
        self.tokenizer, self.answers, self.syncs = tokenizer, answers, 0

    def generate(self, prompt_ids, settings, num_return_sequences=1, seed=None) -> GeneratedBatch:
        out = GeneratedBatch([], [], [], [], [])
        for i, ids in enumerate(prompt_ids):
            for s in range(num_return_sequences):
                text = self.answers[(i + s) % len(self.answers)]
                out.prompt_ids.append(list(ids))
                out.response_ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"]
                                        + [self.tokenizer.eos_token_id])
                out.finished.append(True)
                out.texts.append(text)
                out.prompt_index.append(i)
        return out

    def sync_weights(self, model) -> None:
        self.syncs += 1


def test_trainer_runs_on_any_rollout_engine(tmp_path):
    """The trainer only talks to the RolloutEngine interface: a scripted backend's texts are what gets scored,
    and it is told to sync after each update phase."""
    from humanalign.config.base import load_config
    from humanalign.config.ppo import PPOConfig
    from humanalign.engine import Engine
    from humanalign.trainers.ppo import PPOTrainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS + ["One more prompt?"]))
    cfg = load_config(PPOConfig, values=dict(
        actor_model_path="tiny", reward_fn="keyword_reward", reward_fn_kwargs={"keywords": ["garden"]},
        prompts_path=str(prompts), output_dir=str(tmp_path / "run"), rollout_batch_size=2, batch_size=2,
        max_new_tokens=8, max_steps=2, logging_steps=1, report_to=["none"], progress_bar=False, max_length=96, max_prompt_length=48))
    with Engine(cfg, name="ppo") as engine:
        trainer = PPOTrainer(cfg, engine)
        scripted = ScriptedEngine(trainer.tokenizer, ["my garden", "a garden garden garden", "no"])
        trainer.rollout_engine = scripted
        trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["train/reward"] for r in rows if "train/reward" in r]
    # each rollout answers 2 prompts with answers 0 and 1: keyword shares 1/2 and 3/4 -> mean 0.625
    assert rewards == pytest.approx([0.625, 0.625])
    assert scripted.syncs == 2


def test_lean_loop_greedy_writes_what_generate_writes(actor):
    """Greedy: the lean loop (prefill once, cache repeated G times) writes generate's tokens, stops included
    (every 7th token stops)."""
    model, tokenizer = actor
    stops = list(range(0, len(tokenizer), 7))
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    out = {sampler: HFRolloutEngine(model, tokenizer, stop_token_ids=stops, sampler=sampler).generate(
        _ids(tokenizer), settings, num_return_sequences=4, seed=3) for sampler in ("loop", "generate")}
    assert out["loop"].response_ids == out["generate"].response_ids
    assert out["loop"].finished == out["generate"].finished
    assert out["loop"].prompt_index == out["generate"].prompt_index


def _first_token_probs(model, tokenizer, ids, settings) -> torch.Tensor:
    """The distribution generate samples the first answer token from: softmax of the warped last logits."""
    from humanalign.rollout.hf import warpers

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[:, -1]
    return torch.softmax(warpers(settings)(torch.tensor([ids]), logits.float()), dim=-1)[0]


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=1),
                                      GenerationSettings(max_new_tokens=1, temperature=0.7, top_k=50, top_p=0.9)],
                         ids=["sampled", "warped"])
def test_lean_loop_samples_from_generates_distribution(actor, settings):
    """Sampled: 8,000 first tokens of the loop follow the warped softmax generate draws from, never a token the
    warpers removed, and the same seed gives the same tokens. The tiny model is near uniform over ~1.5k tokens,
    so tokens are grouped into 20 buckets by probability rank: total variation under 0.05 over the buckets
    (sampling noise ~0.02; the sampler itself is checked token by token in the next test)."""
    model, tokenizer = actor
    ids = _ids(tokenizer)[0]
    engine = HFRolloutEngine(model, tokenizer, stop_token_ids=[0])
    out = engine.generate([ids], settings, num_return_sequences=8000, seed=3)
    drawn = torch.tensor([r[0] for r in out.response_ids])
    probs = _first_token_probs(model, tokenizer, ids, settings).double()
    support = int((probs > 0).sum())
    rank = torch.empty_like(drawn, dtype=torch.long, device="cpu").new_zeros(probs.numel())
    rank[probs.argsort(descending=True)] = torch.arange(probs.numel())
    bucket = (rank * 20 // support).clamp(max=19)  # the zero-probability tokens land in the last bucket
    expected = torch.zeros(20, dtype=torch.float64).index_add_(0, bucket, probs)
    observed = torch.bincount(bucket[drawn], minlength=20).double() / drawn.numel()
    assert 0.5 * (observed - expected).abs().sum() < 0.05, (observed, expected)
    assert bool((probs[drawn] > 0).all())
    again = engine.generate([ids], settings, num_return_sequences=8000, seed=3)
    assert again.response_ids == out.response_ids


def test_sample_categorical_hand_worked_and_by_frequency():
    from humanalign.rollout.hf import sample_categorical

    # cdf of [0, .5, 0, .5] is [0, .5, .5, 1]: u < .5 -> token 1, u >= .5 -> token 3; zeros never drawn
    scores = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 3))
    with mock_rand(torch.tensor([[0.0], [0.4999], [0.5]])):
        assert sample_categorical(scores).tolist() == [1, 1, 3]
    with mock_rand(torch.tensor([[1.0], [1.0], [1.0]])):  # u * total rounded up to total: the last real token
        assert sample_categorical(scores).tolist() == [3, 3, 3]
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4])
    drawn = sample_categorical(torch.log(probs).expand(20000, -1))
    freq = torch.bincount(drawn, minlength=5).double() / 20000
    assert freq[1] == 0 and torch.allclose(freq, probs.double(), atol=0.015)


def mock_rand(values: torch.Tensor):
    from unittest import mock

    return mock.patch.object(torch, "rand", lambda *shape, **_: values.clone())


def test_response_positions_only_head_gives_the_full_logits_logps(actor):
    """A forward with logits_to_keep=batch.logits_to_keep() (the LM head skips the prompts' common part) gives
    the full forward's response log-probs and entropies, prompts of different lengths included."""
    model, tokenizer = actor
    ids = _ids(tokenizer)
    batch = RolloutBatch.from_generation(ids, [[5, 6, 7], [8], [9, 10]], tokenizer.pad_token_id, torch.device("cpu"))
    assert batch.logits_to_keep() == batch.input_ids.shape[1] - (min(len(p) for p in ids) - 1)
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    kept = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 logits_to_keep=batch.logits_to_keep()).logits
    assert kept.shape[1] < full.shape[1]
    for a, b in zip(response_logps(full, batch, with_entropy=True), response_logps(kept, batch, with_entropy=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
