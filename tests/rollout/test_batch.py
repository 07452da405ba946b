"""Rollout tensors: the [prompt | response] layout, the positions that choose each response token, and the
per-token values read off them."""

from __future__ import annotations

import pytest
import torch

from humanalign.rollout.batch import (
    RolloutBatch,
    response_logps,
    response_values,
    shared_prompt_plan,
    shared_response_logps,
)


def test_rollout_layout_hand_worked():
    # prompt [1, 2, 3] + response [4, 5]; prompt [6] + response [7, 8, 9]; pad 0
    batch = RolloutBatch.from_generation([[1, 2, 3], [6]], [[4, 5], [7, 8, 9]], 0, torch.device("cpu"))
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.starts.tolist() == [3, 1]
    assert batch.response_ids.tolist() == [[4, 5, 0], [7, 8, 9]]
    # the logits choosing response token t sit at start - 1 + t (row 0's padding slot clamps to the end)
    assert batch.action_positions().tolist() == [[2, 3, 4], [0, 1, 2]]
    values = torch.arange(10, dtype=torch.float32).view(2, 5)  # value at (row, position) = 5 row + position
    assert response_values(values, batch).tolist() == [[2.0, 3.0, 0.0], [5.0, 6.0, 7.0]]
    one = batch.select([0])  # trimmed to its own width: 5 tokens, 2 response tokens
    assert one.input_ids.tolist() == [[1, 2, 3, 4, 5]] and one.response_ids.tolist() == [[4, 5]]
    assert batch.select([1]).input_ids.tolist() == [[6, 7, 8, 9]]


def test_shared_prompt_plan_by_hand():
    """Rows 0 and 2 share prompt [1, 2], row 1 has prompt [3]: two packed rows, each answer's positions restart at
    its prompt's end, and each answer sees its prompt and itself only."""
    batch = RolloutBatch.from_generation([[1, 2], [3], [1, 2]], [[4, 5], [6], [7, 8, 9]], 0, torch.device("cpu"))
    plan = shared_prompt_plan(batch)
    assert plan["input_ids"].tolist() == [[1, 2, 4, 5, 7, 8, 9], [3, 6, 0, 0, 0, 0, 0]]
    assert plan["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 0, 0, 0, 0, 0]]
    sees = plan["attention_mask"][0, 0].int().tolist()  # (7, 7) query row may see key column
    assert sees[3] == [1, 1, 1, 1, 0, 0, 0]  # answer 1's second token: the prompt and answer 1
    assert sees[5] == [1, 1, 0, 0, 1, 1, 0]  # answer 2's second token: the prompt and answer 2, not answer 1
    # the logits that choose each answer token: the prompt's last position for the first, then the answer's own
    assert plan["index"].tolist() == [1, 2, 1, 4, 5, 7 + 0]
    assert plan["target"].tolist() == [4, 5, 7, 8, 9, 6]
    assert plan["dense"].tolist() == [0, 1, 6, 7, 8, 3]  # rows 0, 2, 1 in the (3, R=3) response grid


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_logps_equal_the_padded_forward(lora):
    """The tiny model: log-probs, entropies and gradients of the shared-prompt layout equal the padded rows'
    (``response_logps`` on the full forward) within 1e-5, for groups split and shuffled across a micro-batch."""
    from humanalign.config.training import LoraSettings, ModelSettings
    from humanalign.models.load import load_causal_lm
    from humanalign.models.tiny import tiny_model_path

    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_model_path()), ModelSettings(), LoraSettings(enabled=lora, r=4, dropout=0.0))
    prompts, answers = [], []
    for size in (5, 9, 3):  # three prompts, three answers of 1 to 7 tokens each
        prompt = torch.randint(3, 1500, (size,)).tolist()
        for _ in range(3):
            prompts.append(prompt)
            answers.append(torch.randint(3, 1500, (int(torch.randint(1, 8, ())),)).tolist())
    batch = RolloutBatch.from_generation(prompts, answers, 0, torch.device("cpu")).select([4, 0, 7, 1, 8, 3, 6])
    trained = [p for p in model.parameters() if p.requires_grad]

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected, expected_entropy = response_logps(logits, batch, with_entropy=True)
    expected_grads = torch.autograd.grad((expected * torch.arange(expected.numel()).view_as(expected)).sum(), trained)

    def forward(**inputs):
        return model(**inputs, use_cache=False).logits

    plan = shared_prompt_plan(batch)
    assert plan["input_ids"].shape[0] == 3  # one packed row per prompt
    logps, entropy = shared_response_logps(forward, model, plan, batch, with_entropy=True)
    grads = torch.autograd.grad((logps * torch.arange(logps.numel()).view_as(logps)).sum(), trained)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    assert (logps[batch.response_mask == 0] == 0).all()
    # packed and padded rows sum in different orders: float32 gradients of this sum (weights up to 48) agree to
    # ~1e-4 relative, and to 2e-4 on one CPU seen on 2026-12-05; a wrong position or mask is off by far more
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
