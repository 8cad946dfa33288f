"""The validated-reply loop shared by the LLM strategists (:mod:`agents.strategists`, :mod:`agents.llm_pruning`).

:func:`ask_validated` asks an OpenAI-compatible chat endpoint, extracts the first JSON object of the reply,
validates it into a pydantic model (plus optional context checks and a conversion), and on an invalid reply
re-asks with the error text, at most ``config.max_retries`` times. Nothing in a reply is ever executed.
The caller turns a failed :class:`LLMReply` (``value is None``) into its heuristic fallback, with
``failure`` as the recorded reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from agents.history import truncate
from agents.schemas import extract_json, format_validation_error

if TYPE_CHECKING:  # pragma: no cover
    from agents.strategists import LLMStrategist

__all__ = ["LLMReply", "ask_validated", "redacted_raw"]

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


def redacted_raw(agent: LLMStrategist, raw: Sequence[str]) -> str | None:
    """All replies joined by ``---``, truncated, with the API key redacted; ``None`` when there are none."""
    return agent._redact(truncate("\n---\n".join(raw))) if raw else None


@dataclass
class LLMReply(Generic[R]):
    """Outcome of :func:`ask_validated`.

    ``value`` is the accepted result (``None`` when the loop gave up, then ``failure`` says why:
    ``"LLM request failed: ..."`` or ``"invalid LLM output after N attempts: ..."``). ``raw`` holds every
    reply text, ``notes`` one line per rejected attempt (plus ``"valid after N attempts"`` on a late success)
    and ``raw_reply`` the redacted, truncated join of ``raw``.
    """

    value: R | None
    raw: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    attempts: int = 0
    failure: str | None = None
    raw_reply: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def ask_validated(agent: LLMStrategist, messages: list[dict[str, str]], schema: type[M], *,
                  reask: Callable[[str], str], errors: Callable[[M], Sequence[str]] | None = None,
                  convert: Callable[[M], R] | None = None) -> LLMReply[R]:
    """Ask ``agent``'s endpoint until a reply validates into ``schema``; at most ``1 + config.max_retries`` asks.

    ``agent`` supplies ``client``, ``config`` (model, temperature, max_tokens, seed, max_retries),
    ``_use_response_format`` (JSON mode; set to ``False`` for good when the server rejects it with a 400,
    and the same request is retried once without it), ``_describe`` and ``_redact``.
    Each reply: :func:`~agents.schemas.extract_json` -> ``schema.model_validate`` -> ``errors(model)``
    (non-empty list = invalid, joined by ``"; "``) -> ``convert(model)`` (may raise ``ValueError``). Any
    failure there is recorded as ``attempt N: <error>`` and sent back with ``reask(error)`` as the next user
    message (``messages`` is extended in place). A transport error ends the loop at once.
    """
    import openai

    raw: list[str] = []
    notes: list[str] = []
    attempts = 0
    last_error = "no reply"
    cfg = agent.config
    while attempts <= cfg.max_retries:
        attempts += 1
        kwargs: dict[str, Any] = dict(model=cfg.model, messages=messages, temperature=cfg.temperature)
        if cfg.max_tokens:
            kwargs["max_tokens"] = cfg.max_tokens
        if cfg.seed is not None:
            kwargs["seed"] = cfg.seed
        if agent._use_response_format:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            try:
                resp = agent.client.chat.completions.create(**kwargs)
            except openai.BadRequestError as exc:
                if "response_format" not in kwargs:
                    raise
                # the server does not support JSON mode: ask again without it (and remember)
                agent._use_response_format = False
                notes.append(f"server rejected response_format ({agent._describe(exc)}); retried without it")
                kwargs.pop("response_format")
                resp = agent.client.chat.completions.create(**kwargs)
        except openai.OpenAIError as exc:
            return LLMReply(None, raw, notes, attempts, f"LLM request failed: {agent._describe(exc)}",
                            redacted_raw(agent, raw))
        try:
            content = resp.choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError):
            content = ""
        raw.append(content)
        try:
            model = schema.model_validate(extract_json(content))
            errs = list(errors(model)) if errors is not None else []
            if errs:
                raise ValueError("; ".join(errs))
            value = convert(model) if convert is not None else model
        except ValidationError as exc:
            last_error = "schema validation failed: " + format_validation_error(exc)
        except ValueError as exc:
            last_error = str(exc).splitlines()[0][:400]
        else:
            return LLMReply(value, raw, notes + ([f"valid after {attempts} attempts"] if attempts > 1 else []),
                            attempts, None, redacted_raw(agent, raw))
        notes.append(f"attempt {attempts}: {last_error}")
        messages.append({"role": "assistant", "content": content})
        messages.append({"role": "user", "content": reask(last_error)})
    return LLMReply(None, raw, notes, attempts, f"invalid LLM output after {attempts} attempts: {last_error}",
                    redacted_raw(agent, raw))
