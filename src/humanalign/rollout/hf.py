"""Rollouts with transformers' ``model.generate``: left-padded batches, KV cache, the live actor's weights."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from humanalign.data.tokenize import pad_sequences
from humanalign.data.tokenize import stop_token_ids as default_stop_ids
from humanalign.rollout.base import GeneratedBatch, GenerationSettings, RolloutEngine


class HFRolloutEngine(RolloutEngine):
    """Generates with the actor itself (a ``PreTrainedModel`` or ``PeftModel``), so no weight sync is needed.

    Prompts are left-padded so that every answer starts at the same position and the KV cache serves the whole
    batch; ``batch_size`` prompts (times ``num_return_sequences`` answers) are generated at once (None: all).
    The model is put in eval mode while generating (no dropout, the cache on even with gradient checkpointing)
    and back to its previous mode afterwards. Sampling uses a forked RNG seeded with ``seed``: the same seed
    and prompts give the same answers, and the caller's random stream is left untouched.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int | None = None,
                 stop_token_ids: Sequence[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.stop_ids = sorted(set(stop_token_ids if stop_token_ids is not None else default_stop_ids(model, tokenizer)))
        if not self.stop_ids:
            raise ValueError("no stop token: the tokenizer has no EOS / end-of-turn token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _config(self, settings: GenerationSettings, num_return_sequences: int):
        # Every field is set so that a checkpoint's own generation_config (often top_k=50) cannot change what
        # was asked for; the warpers only apply when sampling.
        warpers = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
            **(warpers if settings.do_sample else {}), repetition_penalty=settings.repetition_penalty,
            num_return_sequences=num_return_sequences, num_beams=1, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id, use_cache=True,
        )

    def _split(self, rows: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
        stops = set(self.stop_ids)
        responses, finished = [], []
        for row in rows:
            cut = next((i for i, tok in enumerate(row) if tok in stops), None)
            responses.append(row[: cut + 1] if cut is not None else row)  # the stop token is an action too
            finished.append(cut is not None)
        return responses, finished

    def _decode(self, response: list[int], finished: bool) -> str:
        body = response[:-1] if finished else response
        return self.tokenizer.decode(body, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], settings: GenerationSettings,
                 num_return_sequences: int = 1, seed: int | None = None) -> GeneratedBatch:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("an empty prompt cannot be answered")
        device = self.device
        # transformers refuses num_return_sequences > 1 without sampling: repeat the prompts instead
        repeat = 1 if settings.do_sample else num_return_sequences
        config = self._config(settings, num_return_sequences // repeat)
        out = GeneratedBatch([], [], [], [], [])
        step = self.batch_size or max(1, len(prompt_ids))
        was_training = self.model.training
        self.model.eval()
        forked = [device] if device.type == "cuda" else []
        start_time = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=forked):
                if seed is not None:
                    torch.manual_seed(seed)
                for start in range(0, len(prompt_ids), step):
                    chunk = [list(p) for p in prompt_ids[start:start + step] for _ in range(repeat)]
                    input_ids = pad_sequences(chunk, self.pad_id, side="left").to(device)  # (b, P)
                    mask = pad_sequences([[1] * len(p) for p in chunk], 0, side="left").to(device)  # (b, P)
                    generated = self.model.generate(input_ids=input_ids, attention_mask=mask,
                                                    generation_config=config)  # (b * n, P + new)
                    responses, finished = self._split(generated[:, input_ids.shape[1]:].tolist())
                    for j, (response, done) in enumerate(zip(responses, finished)):
                        index = start + j // num_return_sequences
                        out.prompt_ids.append(list(prompt_ids[index]))
                        out.response_ids.append(response)
                        out.finished.append(done)
                        out.texts.append(self._decode(response, done))
                        out.prompt_index.append(index)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            self.model.train(was_training)
        out.seconds = time.perf_counter() - start_time
        return out


__all__ = ["HFRolloutEngine"]
