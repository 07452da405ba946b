"""`humanalign eval ppl`: perplexity of a model on answers, and its mean per-token KL to a reference model.

Scored tokens: the assistant's tokens only (through the end-of-turn token), never the prompt. Records may be
prepared preference pairs (``prompt`` + ``chosen``: the preferred answer is scored), prompt/response records
(``prompt`` + ``response``, e.g. generation or distillation output) or SFT conversations (``messages``: every
assistant turn is scored).

perplexity = exp(total NLL / total scored tokens) over the whole file (token-weighted, as in language-model
evaluation, so long answers count by their length). KL(policy || ref) is averaged over the same tokens:
KL = sum_t sum_v p(v) (log p(v) - log q(v)), a measure of how far alignment moved the model from its start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from humanalign.data.io import atomic_write_json, iter_records
from humanalign.data.records import prompt_from_jsonable
from humanalign.data.tokenize import TruncationStats, collate_sft, encode_conversation, encode_prompt_response
from humanalign.errors import RecordError, UserError
from humanalign.eval.generate import require
from humanalign.models.load import load_causal_lm, load_tokenizer, resolve_model_path
from humanalign.models.logprobs import forward_logits, per_token_kl, sequence_logps

SUPPORTED = "'prompt' + 'chosen' (pairs), 'prompt' + 'response', or 'messages' (conversations)"


def encode_eval_records(path: str | Path, tokenizer: Any, max_length: int, max_prompt_length: int,
                        limit: int | None = None) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Tokenise the file's answers -> ([{"input_ids", "labels"}], truncation counts)."""
    stats = TruncationStats()
    examples: list[dict[str, list[int]]] = []
    for line, rec in iter_records(path):
        try:
            if "messages" in rec:
                enc = encode_conversation(tokenizer, rec["messages"], max_length, stats)
            elif "prompt" in rec and ("chosen" in rec or "response" in rec):
                field = "chosen" if "chosen" in rec else "response"
                if not isinstance(rec[field], str):
                    raise RecordError(path, line, field, "must be a string (run prepare-data first)")
                enc = encode_prompt_response(tokenizer, prompt_from_jsonable(rec["prompt"]), rec[field],
                                             max_length, max_prompt_length, stats)
            else:
                raise RecordError(path, line, None, f"no answer to score; expected {SUPPORTED}")
        except (ValueError, TypeError, KeyError) as exc:
            raise RecordError(path, line, None, f"cannot encode ({exc})") from None
        if enc is not None:
            examples.append(enc)
        if limit is not None and stats.total >= limit:
            break
    return examples, stats.as_dict()


@torch.inference_mode()
def score_examples(model: Any, examples: list[dict[str, list[int]]], pad_token_id: int, batch_size: int = 8,
                   ref_model: Any | None = None, progress: bool = False) -> dict[str, float]:
    """Token-weighted NLL (and KL to ``ref_model``) over the label tokens of ``examples``.

    Returns {"tokens", "nll_sum", "nll_per_token", "perplexity"} plus, with a reference model,
    {"kl_per_token", "ref_nll_per_token", "ref_perplexity"}.
    """
    device = next(model.parameters()).device
    totals = {"tokens": 0, "nll_sum": 0.0, "ref_nll_sum": 0.0, "kl_sum": 0.0}
    # Longest first: the slowest batch runs first (memory errors show at once) and padding stays small.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bar = tqdm(total=len(order), desc="perplexity", unit="example", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        batch = collate_sft([examples[i] for i in order[start:start + batch_size]], pad_token_id)
        input_ids = batch["input_ids"].to(device)  # (B, T)
        mask = batch["attention_mask"].to(device)  # (B, T)
        labels = batch["labels"].to(device)  # (B, T)
        logits = forward_logits(model, input_ids, mask)  # (B, T, V)
        logps, n_tokens = sequence_logps(logits, labels)  # (B,) summed log-probs, (B,) scored tokens
        totals["tokens"] += int(n_tokens.sum())
        totals["nll_sum"] -= float(logps.sum())
        if ref_model is not None:
            ref_logits = forward_logits(ref_model, input_ids, mask)  # (B, T, V)
            totals["ref_nll_sum"] -= float(sequence_logps(ref_logits, labels)[0].sum())
            # per_token_kl is each sequence's mean over its scored tokens: weight by them for a token mean
            totals["kl_sum"] += float((per_token_kl(logits, ref_logits, labels) * n_tokens).sum())
        bar.update(input_ids.shape[0])
    bar.close()
    n = totals["tokens"]
    if n == 0:
        raise UserError("no answer tokens to score")
    out = {"tokens": n, "nll_sum": totals["nll_sum"], "nll_per_token": totals["nll_sum"] / n,
           "perplexity": math.exp(totals["nll_sum"] / n)}
    if ref_model is not None:
        out.update({"kl_per_token": totals["kl_sum"] / n, "ref_nll_per_token": totals["ref_nll_sum"] / n,
                    "ref_perplexity": math.exp(totals["ref_nll_sum"] / n)})
    return out


def _load(name: str, settings: Any) -> tuple[Any, Any]:
    path = resolve_model_path(name)
    model = load_causal_lm(path, settings, trainable=False)
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    return model.eval(), load_tokenizer(path, settings)


def run(cfg: Any) -> dict[str, Any]:
    model_name = require(cfg.model, "model", "eval ppl")
    data = require(cfg.data, "data", "eval ppl")
    if cfg.output and Path(cfg.output).exists() and not cfg.overwrite:
        raise UserError(f"{cfg.output}: already exists; pass --overwrite to replace it")
    model, tokenizer = _load(model_name, cfg.model_settings)
    ref_model = None
    if cfg.ref_model:
        ref_model, ref_tokenizer = _load(cfg.ref_model, cfg.model_settings)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"{cfg.ref_model}: its tokenizer differs from {model_name}'s; the KL needs the same one")
    examples, truncation = encode_eval_records(data, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.limit)
    if truncation["dropped_empty"] or truncation["response_truncated"]:
        print(f"[humanalign] {data}: {truncation['response_truncated']} answers cut to max_length, "
              f"{truncation['dropped_empty']} left out with no answer token")
    if not examples:
        raise UserError(f"{data}: no record has an answer token within max_length={cfg.max_length}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = score_examples(model, examples, pad_id, cfg.batch_size, ref_model, cfg.progress_bar)
    result = {"model": model_name, "ref_model": cfg.ref_model, "data": str(data), "examples": len(examples),
              **scores, "truncation": truncation}
    line = f"[humanalign] perplexity {scores['perplexity']:.3f} over {scores['tokens']} answer tokens"
    if ref_model is not None:
        line += f"; KL to {cfg.ref_model} {scores['kl_per_token']:.4f} nats/token " \
                f"(reference perplexity {scores['ref_perplexity']:.3f})"
    print(line)
    if cfg.output:
        atomic_write_json(cfg.output, result)
    return result
