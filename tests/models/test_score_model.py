"""Score models: plain-transformers parity after saving, the end-score position, padding, LoRA merges,
the pad-vs-EOS fix and the score normaliser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from humanalign.config.training import LoraSettings
from humanalign.data.tokenize import pad_sequences
from humanalign.errors import UserError
from humanalign.models.load import resolve_model_path
from humanalign.models.score_model import (
    PAD_TOKEN,
    SCORE_CONFIG_KEY,
    ScoreModel,
    ScoreNormalizer,
    encode_score_input,
    load_score_model,
    save_score_model,
)
from humanalign.models.tiny import build_tiny_model

TEXTS = ["Hello there, how are you doing today?", "The quick brown fox jumps over the lazy dog.",
         "I cannot help with that request, it could hurt someone.", "Here is a recipe for a cake."] * 10
EXAMPLES = [("hello", "I cannot help"), ("how do I bake a cake?", "Here is a recipe for a cake with eggs."),
            ("tell me about the fox", "The quick brown fox jumps over the lazy dog, twice, and then sleeps.")]


def _batch(model: ScoreModel, tokenizer, examples=EXAMPLES):
    seqs = [encode_score_input(tokenizer, [{"role": "user", "content": p}], r, 96, 32, encoder=model.is_encoder)
            ["input_ids"] for p, r in examples]
    ids = pad_sequences(seqs, tokenizer.pad_token_id, "right")  # (B, T)
    mask = pad_sequences([[1] * len(s) for s in seqs], 0, "right")  # (B, T)
    return seqs, ids, mask


def _scale_head(model: ScoreModel, factor: float = 50.0) -> None:
    # random-init heads give scores near 0; scaling makes differences between texts visible in the asserts
    inner = model.model.get_base_model() if model.is_peft else model.model
    head = inner.score if model.layout == "decoder" else inner.classifier
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(factor)


# --------------------------------------------------------------------------------------------- normaliser


def test_running_normalizer_matches_exact_mean_and_population_variance():
    norm = ScoreNormalizer("running")
    norm.update(torch.tensor([1.0, 2.0, 3.0]))
    norm.update(torch.tensor([4.0, 5.0, float("nan")]))  # NaN ignored
    # 1..5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert norm.count == 5
    assert norm.mean == pytest.approx(3.0)
    assert norm.var == pytest.approx(2.0)
    assert norm.normalize(torch.tensor([3.0 + 2**0.5])).item() == pytest.approx(1.0, abs=1e-6)


def test_ema_normalizer_hand_worked():
    norm = ScoreNormalizer("ema", momentum=0.5)  # starts at mean 0, var 1 (Safe RLHF)
    norm.update(torch.tensor([2.0, 4.0]))  # batch mean 3, var 1 -> mean 0.5*0 + 0.5*3 = 1.5, var 1.0
    assert (norm.mean, norm.var) == pytest.approx((1.5, 1.0))
    norm.update(torch.tensor([0.0]))  # batch mean 0, var 0 -> mean 0.75, var 0.5
    assert (norm.mean, norm.var, norm.count) == pytest.approx((0.75, 0.5, 3))
    assert norm.normalize(torch.tensor([0.75])).item() == pytest.approx(0.0)
    again = ScoreNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again.to_dict() == norm.to_dict()


@pytest.mark.parametrize("kind", ["running", "ema"])
def test_normalizer_update_and_normalize_read_nothing_on_the_host(kind, monkeypatch):
    """The statistics stay on the scores' device: no item / float / bool / tolist in update or normalize (each
    waits for the GPU); an all-NaN batch changes nothing; they are read only by to_dict (logging, saving)."""
    torch.manual_seed(0)
    batches = [torch.randn(6) * 3 + 1, torch.full((4,), float("nan")), torch.randn(5) - 2]
    mean, var, count = 0.0, 1.0, 0  # the reference: Safe RLHF's update in Python floats
    for batch in (b for b in batches if torch.isfinite(b).any()):
        n, b_mean, b_var = batch.numel(), batch.double().mean().item(), batch.double().var(unbiased=False).item()
        if kind == "running":
            delta, total = b_mean - mean, count + n
            mean, var = mean + delta * n / total, (var * count + b_var * n + delta**2 * count * n / total) / total
        else:
            mean, var = 0.8 * mean + 0.2 * b_mean, 0.8 * var + 0.2 * b_var
        count += n
    norm = ScoreNormalizer(kind, momentum=0.8)

    def host_read(*args, **kwargs):
        raise AssertionError("a host read in the normaliser")

    with monkeypatch.context() as patched:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
            patched.setattr(torch.Tensor, name, host_read)
        for batch in batches:
            norm.update(batch)
        normalized = norm.normalize(torch.tensor([0.5, -1.0]))
    state = norm.to_dict()
    assert state["count"] == count == 11 and (state["mean"], state["var"]) == pytest.approx((mean, var))
    assert normalized.tolist() == pytest.approx(((torch.tensor([0.5, -1.0]) - state["mean"])
                                                 / (state["var"] ** 0.5 + 1e-8)).tolist(), rel=1e-6)


def test_none_normalizer_is_identity_and_bad_kind_is_a_user_error():
    norm = ScoreNormalizer("none")
    norm.update(torch.tensor([10.0, 20.0]))
    assert norm.normalize(torch.tensor([10.0])).item() == 10.0
    with pytest.raises(UserError, match="normaliser"):
        ScoreNormalizer("zscore")


# --------------------------------------------------------------------------------------------- decoder


def test_decoder_save_reload_parity_with_plain_transformers(decoder_dir, tmp_path):
    model, tok = load_score_model(str(decoder_dir))
    assert model.layout == "decoder" and tok.pad_token_id != tok.eos_token_id
    _scale_head(model)
    model.eval()
    seqs, ids, mask = _batch(model, tok)
    with torch.no_grad():
        ours = model(ids, mask)
    # end score is read at the last real token (the <|im_end|> closing the answer), not at padding
    assert ours.end_index.tolist() == [len(s) - 1 for s in seqs]
    assert ids[0, ours.end_index[0]].item() == tok.eos_token_id
    assert torch.allclose(ours.end_scores, ours.scores[torch.arange(3), ours.end_index])
    assert ours.end_scores.std() > 1e-3  # the three texts really get different scores

    norm = ScoreNormalizer("ema", momentum=0.9)
    norm.update(ours.end_scores)
    save_score_model(model, tok, tmp_path / "rm", normalizer_state=norm, score_type="cost",
                     extra={"max_length": 96, "max_prompt_length": 32})
    block = json.loads((tmp_path / "rm" / "config.json").read_text())[SCORE_CONFIG_KEY]
    assert block["score_type"] == "cost" and block["end_score"] == "last_non_pad_token"
    assert block["normalizer"]["count"] == 3 and block["max_length"] == 96

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours.end_scores, atol=1e-5, rtol=0)

    again, tok2 = load_score_model(str(tmp_path / "rm"), allow_new_head=False)
    assert again.score_type == "cost" and again.normalizer.to_dict() == norm.to_dict()
    assert tok2.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids, mask).end_scores, ours.end_scores, atol=1e-5, rtol=0)
        normalized = again(ids, mask, normalize=True).end_scores
    torch.testing.assert_close(normalized, (ours.end_scores - norm.mean) / (norm.std + norm.epsilon))


def test_decoder_padding_invariance(decoder_dir):
    model, tok = load_score_model(str(decoder_dir))
    _scale_head(model)
    model.eval()
    seqs, ids, mask = _batch(model, tok)
    assert len(seqs[0]) < ids.shape[1]  # the first example is padded in the batch
    with torch.no_grad():
        batched = model(ids, mask).end_scores
        for i, seq in enumerate(seqs):
            alone = model(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).end_scores
            assert abs(alone.item() - batched[i].item()) < 1e-5
        # reading the score at the last position instead (a pad token) would give another number
        at_pad = model(ids, mask).scores[0, -1]
    assert abs(at_pad.item() - batched[0].item()) > 1e-4


def test_decoder_forward_on_a_padded_batch_reads_nothing_on_the_host(decoder_dir, monkeypatch):
    """The padding mask goes to the decoder as a 4-D mask: transformers then has nothing to test on the host (its
    padding_mask.all() is a GPU sync per forward), and every real position's token-wise score is the row's own."""
    model, tok = load_score_model(str(decoder_dir))
    _scale_head(model)
    model.eval()
    seqs, ids, mask = _batch(model, tok)

    def host_read(*args, **kwargs):
        raise AssertionError("a host read in the forward")

    with torch.no_grad(), monkeypatch.context() as patched:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            patched.setattr(torch.Tensor, name, host_read)
        batched = model(ids, mask).scores  # (B, T)
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            alone = model(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).scores[0]
            assert torch.allclose(batched[i, : len(seq)], alone, atol=1e-5)


def test_pad_equal_to_eos_gets_its_own_pad_token(tmp_path):
    folder = build_tiny_model(tmp_path / "noPad", texts=TEXTS, vocab_size=300, hidden_size=16, num_layers=1,
                              num_heads=2, num_kv_heads=1, intermediate_size=32, seed=2)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)  # a tokenizer with no pad token: load_tokenizer falls back to pad = eos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]

    model, tok = load_score_model(str(folder))
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    assert model.model.get_input_embeddings().num_embeddings == vocab + 1 == len(tok)
    assert model.pad_token_id == tok.pad_token_id
    _scale_head(model)
    model.eval()
    seqs, ids, mask = _batch(model, tok)
    with torch.no_grad():
        ours = model(ids, mask)
    assert ids[0, ours.end_index[0]].item() == tok.eos_token_id  # the closing EOS is scored, not skipped
    save_score_model(model, tok, tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours.end_scores, atol=1e-5, rtol=0)


def test_lora_score_model_saves_merged_weights(decoder_dir, tmp_path):
    lora = LoraSettings(enabled=True, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model, tok = load_score_model(str(decoder_dir), lora=lora)
    assert model.is_peft
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    torch.manual_seed(3)
    with torch.no_grad():  # pretend training moved the adapter and the head (lora_B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()
    _, ids, mask = _batch(model, tok)
    with torch.no_grad():
        before = model(ids, mask).end_scores
    save_score_model(model, tok, tmp_path / "rm")
    with torch.no_grad():
        after = model(ids, mask).end_scores  # the live model keeps its (unmerged) adapter
    # merge + unmerge round the weights (W + BA - BA): a few float32 ulps of a score near 3.6 (measured up to
    # 1.2e-6 when the suite runs on 1 thread); a save that dropped or changed the adapter would move them far more
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert model.is_peft
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert not any("lora" in k for k in hf.state_dict())
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, before, atol=1e-5, rtol=0)


def test_lora_score_adapter_records_an_absolute_base_path(decoder_dir, tmp_path, monkeypatch):
    """A score model loaded from a relative folder: its adapter names the base by absolute path (loads anywhere)."""
    monkeypatch.chdir(decoder_dir.parent)
    lora = LoraSettings(enabled=True, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model, _ = load_score_model(decoder_dir.name, lora=lora)
    model.model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(decoder_dir.resolve())


def test_gathered_weights_save_as_the_live_model_would(decoder_dir, tmp_path):
    """Under FSDP / DeepSpeed the live parameters are shards, so the engine passes the gathered full state
    (keys of the ScoreModel). Saving from it writes the same file as saving the live model: for a full model,
    and for a LoRA model whose adapter is folded into the gathered base weights (W + alpha/r * B @ A)."""
    from safetensors.torch import load_file

    lora = LoraSettings(enabled=True, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, settings in (("full", None), ("lora", lora)):
        model, tok = load_score_model(str(decoder_dir), lora=settings)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}  # what get_state_dict returns
        save_score_model(model, tok, tmp_path / f"{name}-live")
        save_score_model(model, tok, tmp_path / f"{name}-gathered", state_dict=gathered)
        live = load_file(str(tmp_path / f"{name}-live" / "model.safetensors"))
        from_gathered = load_file(str(tmp_path / f"{name}-gathered" / "model.safetensors"))
        assert live.keys() == from_gathered.keys() and not any("lora" in k for k in live)
        for key in live:  # peft's merge and the gathered merge round differently in the last bit at most
            torch.testing.assert_close(from_gathered[key], live[key], atol=1e-6, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    base = gathered[f"model.base_model.model.{q.replace('.weight', '.base_layer.weight')}"]
    assert (from_gathered[q] - base).abs().max() > 1e-2  # the adapter was folded in, not dropped

    with pytest.raises(UserError, match="not those of this score model"):
        save_score_model(model, tok, tmp_path / "wrong", state_dict={"other.weight": torch.zeros(1)})


def test_save_into_run_folder_keeps_other_files_and_drops_stale_shards(decoder_dir, tmp_path):
    model, tok = load_score_model(str(decoder_dir))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    save_score_model(model, tok, run)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (run / "model-00001-of-00002.safetensors").exists()
    assert (run / "model.safetensors").is_file() and (run / "tokenizer.json").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".score_model.tmp")]


def test_backbone_is_refused_where_a_trained_head_is_needed(decoder_dir):
    with pytest.raises(UserError, match="not a score model"):
        load_score_model(str(decoder_dir), allow_new_head=False)


# --------------------------------------------------------------------------------------------- encoder


def test_encoder_save_reload_parity_and_padding_invariance(encoder_dir, tmp_path):
    model, tok = load_score_model(str(encoder_dir))
    assert model.layout == "bert" and model.is_encoder
    _scale_head(model)
    model.eval()
    seqs, ids, mask = _batch(model, tok)
    assert all(s[0] == tok.cls_token_id and s[-1] == tok.sep_token_id for s in seqs)
    with torch.no_grad():
        ours = model(ids, mask)
        for i, seq in enumerate(seqs):
            alone = model(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).end_scores
            assert abs(alone.item() - ours.end_scores[i].item()) < 1e-5
    assert ours.end_index.tolist() == [0, 0, 0]  # [CLS], pooled
    assert torch.equal(ours.scores[:, 0], ours.end_scores)
    assert ours.end_scores.std() > 1e-4  # a random BERT's [CLS] varies little between texts, but it does vary

    save_score_model(model, tok, tmp_path / "rm", score_type="reward")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours.end_scores, atol=1e-5, rtol=0)
    block = json.loads((tmp_path / "rm" / "config.json").read_text())[SCORE_CONFIG_KEY]
    assert block["end_score"] == "first_token_pooled"


def test_minilm_preset_builds_a_head_on_its_pretrained_encoder():
    from safetensors import safe_open

    model, tok = load_score_model("minilm-l6-v2")
    assert model.layout == "bert" and tok.pad_token == "[PAD]"
    weights = Path(resolve_model_path("minilm-l6-v2")) / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        pooler = f.get_tensor("pooler.dense.weight")
    assert torch.equal(model.model.bert.pooler.dense.weight, pooler)  # the backbone really is MiniLM


# --------------------------------------------------------------------------------------------- training inputs


def test_pairs_encode_collate_and_train_through_lora_with_checkpointing(decoder_dir):
    from humanalign.data.records import HarmlessPair, user_prompt
    from humanalign.data.tokenize import collate_pairs
    from humanalign.losses.reward_cost import reward_pairwise_loss
    from humanalign.models.score_model import encode_score_pair

    lora = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model, tok = load_score_model(str(decoder_dir), lora=lora, score_type="cost")
    model.gradient_checkpointing_enable()
    pairs = [HarmlessPair(prompt=user_prompt("how do I bake a cake?"), chosen="Here is a recipe for a cake.",
                          rejected="I cannot help with that request.", is_chosen_safe=True, is_rejected_safe=False),
             HarmlessPair(prompt=user_prompt("hello"), chosen="Hello there!", rejected="The quick brown fox.",
                          margin=0.5, is_chosen_safe=True, is_rejected_safe=True)]
    features = [encode_score_pair(tok, p, 96, 32) for p in pairs]
    assert features[0]["chosen_input_ids"] == encode_score_input(tok, pairs[0].prompt, pairs[0].chosen, 96, 32)[
        "input_ids"]  # training inputs are exactly the scorer's inputs
    assert "margin" not in features[0] and features[1]["margin"] == 0.5
    batch = collate_pairs([{k: v for k, v in f.items() if k != "margin"} for f in features], tok.pad_token_id)
    assert batch["is_rejected_safe"].tolist() == [0.0, 1.0]

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = []
    for _ in range(6):
        out = model(batch["input_ids"], batch["attention_mask"])  # (2B,) rows: chosen then rejected
        chosen, rejected = out.end_scores[:2], out.end_scores[2:]
        loss = reward_pairwise_loss(chosen, rejected).losses.mean()
        optimizer.zero_grad()
        loss.backward()
        lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert all(g is not None for g in lora_grads) and sum(g.abs().sum() for g in lora_grads) > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05  # the head and adapter really learn the ordering


# ------------------------------------------------------------------------------------- per-group learning rates


def test_param_lr_scale_by_module_hand_worked():
    from humanalign.models.score_model import param_lr_scale

    # 6 layers, head x10, decay 0.5: layer 5 (top) 1, layer 0 0.5^5 = 1/32, embeddings 0.5^6 = 1/64
    bert = {"bert.encoder.layer.5.output.dense.weight": 1.0, "bert.encoder.layer.0.attention.self.query.bias": 1 / 32,
            "bert.embeddings.word_embeddings.weight": 1 / 64, "bert.embeddings.LayerNorm.weight": 1 / 64,
            "bert.pooler.dense.weight": 10.0, "classifier.bias": 10.0}
    llama = {"model.layers.5.mlp.up_proj.weight": 1.0, "model.layers.4.self_attn.q_proj.weight": 0.5,
             "model.embed_tokens.weight": 1 / 64, "model.norm.weight": 1.0, "score.weight": 10.0,
             # LoRA-wrapped names: the adapter lives in its layer, the head is trained in full
             "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight": 0.25,
             "base_model.model.score.modules_to_save.default.weight": 10.0}
    for name, expected in {**bert, **llama}.items():
        assert param_lr_scale(name, 6, 10.0, 0.5) == pytest.approx(expected), name
    assert param_lr_scale("bert.encoder.layer.0.output.dense.weight", 6, 10.0, 1.0) == 1.0  # no decay: one rate


def _tiny_bert_classifier(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32, num_labels=1)
    return BertForSequenceClassification(config)


def test_score_param_groups_set_each_groups_rate_and_decay():
    from humanalign.models.score_model import score_param_groups

    model = ScoreModel(_tiny_bert_classifier())
    groups = score_param_groups(model, 1e-3, 0.01, head_lr_multiplier=10.0, layer_lr_decay=0.5)
    by_rate: dict[float, int] = {}
    for group in groups:
        by_rate[round(group["lr"], 12)] = by_rate.get(round(group["lr"], 12), 0) + len(group["params"])
        assert all(p.ndim >= 2 for p in group["params"]) == (group["weight_decay"] == 0.01)
    # 2 layers: layer 1 at 1e-3, layer 0 at 5e-4, embeddings at 2.5e-4, pooler + classifier at 1e-2;
    # a BERT layer holds 16 tensors, the embeddings 5 (3 tables + LayerNorm weight/bias), the head 4
    assert by_rate == {1e-3: 16, 5e-4: 16, 2.5e-4: 5, 1e-2: 4}
    assert groups[0]["lr"] == 1e-3  # the peak rate first: the engine logs the first group's rate
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_first_adamw_step_moves_each_module_by_its_own_rate():
    """AdamW's first step moves every weight by lr * g / (|g| + eps) = lr (bias-corrected moments are g, g^2):
    the largest change of each module is its group's learning rate."""
    from humanalign.models.score_model import score_param_groups

    model = ScoreModel(_tiny_bert_classifier(seed=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = score_param_groups(model, 1e-3, 0.0, head_lr_multiplier=10.0, layer_lr_decay=0.5)
    optimizer = torch.optim.AdamW(groups, eps=1e-14)  # eps far below the tiny model's smallest gradients
    ids = torch.randint(1, 50, (4, 12))
    model(ids, torch.ones_like(ids)).end_scores.pow(2).sum().backward()
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["model.classifier.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["model.bert.encoder.layer.1.output.dense.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["model.bert.encoder.layer.0.output.dense.weight"] == pytest.approx(5e-4, rel=1e-3)
    assert moved["model.bert.embeddings.word_embeddings.weight"] == pytest.approx(2.5e-4, rel=1e-3)
