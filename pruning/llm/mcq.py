"""Multiple-choice evaluation (MMLU-style JSONL supplied by the user) by choice log-likelihood.

Each line: ``{"question": str, "choices": [str, ...], "answer": int | "A".."Z" | choice text}``
(extra keys such as ``subject`` are kept for per-subject accuracy). The prompt is
``"Question: {question}\\nAnswer:"``; every choice is scored as the summed log-probability of
``" " + choice`` after the prompt. ``accuracy`` picks the highest sum, ``accuracy_norm`` the highest
per-token mean (less biased towards short answers).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator, model_validator

__all__ = ["MCQItem", "MCQResult", "load_mcq", "choice_logprobs", "evaluate_mcq", "PROMPT"]

PROMPT = "Question: {question}\nAnswer:"


class MCQItem(BaseModel):
    question: str
    choices: list[str] = Field(min_length=2)
    answer: int
    subject: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _answer_index(cls, data: Any) -> Any:
        if isinstance(data, dict) and "answer" in data:
            a, choices = data["answer"], data.get("choices") or []
            if isinstance(a, str):
                s = a.strip()
                if s.isdigit():
                    a = int(s)
                elif len(s) == 1 and s.upper().isalpha() and ord(s.upper()) - 65 < len(choices):
                    a = ord(s.upper()) - 65
                elif s in choices:
                    a = choices.index(s)
                else:
                    raise ValueError(f"answer {a!r} is neither an index, a letter nor one of the choices")
            data = {**data, "answer": a}
        return data

    @field_validator("answer")
    @classmethod
    def _in_range(cls, v: int, info) -> int:
        n = len(info.data.get("choices") or [])
        if not 0 <= v < n:
            raise ValueError(f"answer index {v} out of range for {n} choices")
        return v


class MCQResult(BaseModel):
    n: int
    accuracy: float
    accuracy_norm: float
    per_subject: dict[str, float] = Field(default_factory=dict)
    predictions: list[int] = Field(default_factory=list)


def load_mcq(path: str | os.PathLike[str], limit: int | None = None) -> list[MCQItem]:
    """Read and validate a JSONL file; a bad line raises ValueError naming the line number."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"MCQ file not found: {p}")
    items = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(MCQItem.model_validate(json.loads(line)))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{p}:{lineno}: invalid MCQ item: {str(exc).splitlines()[0][:200]}") from None
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{p} has no MCQ items")
    return items


@torch.no_grad()
def choice_logprobs(model: torch.nn.Module, tokenizer, prompt: str, choices: Iterable[str],
                    max_len: int = 512) -> list[tuple[float, int]]:
    """``[(sum log p(choice tokens | prompt), n_tokens)]`` for each choice (one padded batch)."""
    p_ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_token_id is not None)
    seqs, conts = [], []
    for c in choices:
        c_ids = tokenizer.encode(" " + c)
        ids = (p_ids + c_ids)[-max_len:]
        seqs.append(ids)
        conts.append(min(len(c_ids), len(ids) - 1))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=batch.to(device), attention_mask=attn.to(device)).logits.float()
    logp = F.log_softmax(logits, dim=-1).cpu()
    out = []
    for i, s in enumerate(seqs):
        n = conts[i]
        pos = torch.arange(len(s) - n, len(s))  # target positions of the continuation
        lp = logp[i, pos - 1, torch.tensor(s)[pos]].sum()
        out.append((float(lp), n))
    return out


def evaluate_mcq(model: torch.nn.Module, tokenizer, items: list[MCQItem], max_len: int = 512) -> MCQResult:
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    preds: list[int] = []
    subj: dict[str, list[int]] = {}
    try:
        for it in items:
            scores = choice_logprobs(model, tokenizer, PROMPT.format(question=it.question), it.choices, max_len)
            pred = max(range(len(scores)), key=lambda j: (scores[j][0], -j))
            pred_norm = max(range(len(scores)), key=lambda j: (scores[j][0] / max(1, scores[j][1]), -j))
            preds.append(pred)
            correct += pred == it.answer
            correct_norm += pred_norm == it.answer
            if it.subject:
                subj.setdefault(it.subject, []).append(int(pred == it.answer))
    finally:
        model.train(was_training)
    n = len(items)
    return MCQResult(n=n, accuracy=correct / n, accuracy_norm=correct_norm / n,
                     per_subject={k: sum(v) / len(v) for k, v in sorted(subj.items())}, predictions=preds)
