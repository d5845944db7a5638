"""Batched generation with a KV cache: many sequences at once, seeded per
sequence, stop ids and stop strings per sequence, logprobs from the forward
pass that chose each token.

Rows are left-padded to the longest prompt; positions come from the attention
mask, so padding changes no row's result. Each row draws its randomness from
its own generator, seeded by (request seed, prompt index, sample index): which
worker computes a row, and beside which others, does not change its draws.

``logprobs`` of a sampled token are under the distribution it was drawn from
before truncation: ``log_softmax(logits / temperature)`` over the model's whole
output layer (top-k, top-p and the tokenizer's vocabulary, which can be smaller
than the padded output layer, only restrict where it may land); with ``temperature == 0`` (greedy) they are under
the model itself, ``log_softmax(logits)``. At temperature 1 they are the
model's own logprobs, which is what importance-sampling losses need.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

# Tokens decoded at the end of a row to look for stop strings (beyond the
# longest stop string's length, for tokens that hold partial characters).
_STOP_TAIL_SLACK = 8


@dataclass(frozen=True)
class SampleParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    prompt_logprobs: bool = False


def row_seed(seed: int | None, prompt_index: int, sample_index: int) -> int:
    """The seed of one sequence: a function of the request's seed and the
    sequence's place in the request only."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _filtered_probs(logits_BV: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Sampling probabilities after top-k and top-p (nucleus) truncation."""
    probs_BV = torch.softmax(logits_BV, dim=-1)
    if top_k > 0 and top_k < probs_BV.shape[-1]:
        kth = torch.topk(probs_BV, top_k, dim=-1).values[:, -1:]
        probs_BV = torch.where(probs_BV >= kth, probs_BV, torch.zeros_like(probs_BV))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs_BV, dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly likelier tokens
        keep_sorted = before < top_p * sorted_p.sum(dim=-1, keepdim=True)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs_BV = torch.where(keep, probs_BV, torch.zeros_like(probs_BV))
    return probs_BV / probs_BV.sum(dim=-1, keepdim=True)


def _prompt_logprobs(logits_BLV: torch.Tensor, ids_BL: torch.Tensor, pad_B: list[int],
                     rows: list[int]) -> list[list[float | None]]:
    """Per row in ``rows``: None for the first prompt token, then each prompt
    token's logprob given those before it (under the model, temperature 1)."""
    out = []
    for b in rows:
        logits = logits_BLV[b, pad_B[b]:-1].float()
        targets = ids_BL[b, pad_B[b] + 1:].to(logits.device)  # the output layer's GPU
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out.append([None, *lp.tolist()])
    return out


class _Row:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stop_reason: str | None = None


def _hit_stop_string(row: _Row, tokenizer: Any, params: SampleParams) -> bool:
    if not params.stop_strings:
        return False
    tail_len = max(map(len, params.stop_strings)) + _STOP_TAIL_SLACK
    tail = tokenizer.decode(row.tokens[-tail_len:], skip_special_tokens=False)
    return any(s in tail for s in params.stop_strings)


def sample_text(tokens: list[int], tokenizer: Any, params: SampleParams) -> str:
    """The generated text, ending before the stop string that ended it."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cuts = [text.find(s) for s in params.stop_strings if s in text]
    return text[:min(cuts)] if cuts else text


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[list[int]], seeds: list[list[int]],
             params: SampleParams, device: torch.device) -> tuple[list[list[dict]], list | None]:
    """``seeds[p]`` holds one seed per sample of prompt ``p``; ``device`` is where
    the ids go (the input embedding's). Returns, per prompt,
    its samples (``tokens``, ``logprobs``, ``text``, ``stop_reason``), and the
    prompts' logprobs when ``params.prompt_logprobs``."""
    plan = [(p, s) for p, ss in enumerate(seeds) for s in ss]
    width = max(len(prompts[p]) for p, _ in plan)
    pad_B = [width - len(prompts[p]) for p, _ in plan]
    ids_BL = torch.zeros((len(plan), width), dtype=torch.long)
    mask_BL = torch.zeros((len(plan), width), dtype=torch.long)
    for b, (p, _) in enumerate(plan):
        ids_BL[b, pad_B[b]:] = torch.tensor(prompts[p])
        mask_BL[b, pad_B[b]:] = 1
    ids_BL, mask_BL = ids_BL.to(device), mask_BL.to(device)
    pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    kwargs = {} if params.prompt_logprobs else {"logits_to_keep": 1}
    out = model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, use_cache=True,
                **kwargs)
    prompt_lps = None
    if params.prompt_logprobs:
        first_rows = [next(b for b, (p, _) in enumerate(plan) if p == q)
                      for q in range(len(prompts))]
        prompt_lps = _prompt_logprobs(out.logits, ids_BL, pad_B, first_rows)
    logits_BV = out.logits[:, -1].float()
    # Each row's draws come from a generator on the logits' device: ``device``,
    # or with a device map the output layer's GPU.
    rows = [_Row(s, logits_BV.device) for _, s in plan]
    past, pos_B = out.past_key_values, pos_BL[:, -1]
    for _ in range(params.max_tokens):
        next_B = _step(rows, logits_BV, params, tokenizer).to(device)
        if all(r.stop_reason for r in rows):
            break
        mask_BL = torch.cat([mask_BL, torch.ones_like(mask_BL[:, :1])], dim=1)
        pos_B = pos_B + 1
        out = model(input_ids=next_B.unsqueeze(-1), attention_mask=mask_BL,
                    position_ids=pos_B.unsqueeze(-1), past_key_values=past, use_cache=True)
        logits_BV, past = out.logits[:, -1].float(), out.past_key_values
    for r in rows:
        r.stop_reason = r.stop_reason or "length"
    samples: list[list[dict]] = [[] for _ in prompts]
    for (p, _), r in zip(plan, rows, strict=True):
        samples[p].append({"tokens": r.tokens, "logprobs": r.logprobs,
                           "text": sample_text(r.tokens, tokenizer, params),
                           "stop_reason": r.stop_reason})
    return samples, prompt_lps


def _step(rows: list[_Row], logits_BV: torch.Tensor, params: SampleParams, tokenizer: Any
          ) -> torch.Tensor:
    """Choose each unfinished row's next token; the tokens fed back next (a
    finished row's choice is computed too, and ignored)."""
    greedy = params.temperature == 0
    scaled_BV = logits_BV if greedy else logits_BV / params.temperature
    logp_BV = torch.log_softmax(scaled_BV, dim=-1)
    # Ids past the tokenizer's vocabulary (output layers are padded, e.g. to a
    # multiple of 8) are never chosen: they decode to nothing and no batch takes them.
    allowed_BV = scaled_BV.clone()
    allowed_BV[:, len(tokenizer):] = float("-inf")
    if greedy:
        chosen_B = torch.argmax(allowed_BV, dim=-1)
    else:
        probs_BV = _filtered_probs(allowed_BV, params.top_p, params.top_k)
        chosen_B = torch.stack([torch.multinomial(probs_BV[b], 1, generator=r.gen)[0]
                                for b, r in enumerate(rows)])
    chosen = chosen_B.tolist()
    for b, r in enumerate(rows):
        if r.stop_reason:
            continue
        r.tokens.append(chosen[b])
        r.logprobs.append(float(logp_BV[b, chosen[b]]))
        if chosen[b] in params.stop_ids or _hit_stop_string(r, tokenizer, params):
            r.stop_reason = "stop"
        elif len(r.tokens) >= params.max_tokens:
            r.stop_reason = "length"
    return chosen_B
