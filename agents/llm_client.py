"""The OpenAI-compatible client shared by the LLM strategists (:mod:`agents.strategists`, :mod:`agents.llm_pruning`).

:class:`LLMClient` holds the endpoint settings (:class:`LLMConfig`), the lazily built ``openai`` client and
the secret redaction, checks the endpoint at startup (:meth:`LLMClient.check`) and runs the validated-reply
loop (:meth:`LLMClient.ask`): ask, extract the first JSON object of the reply, validate it into a pydantic
model (plus optional context checks and a conversion), and on an invalid reply re-ask with the error text,
at most ``config.max_retries`` times. Nothing in a reply is ever executed. The caller turns a failed
:class:`LLMReply` (``value is None``) into its heuristic fallback, with ``failure`` as the recorded reason.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from agents.history import truncate
from agents.schemas import extract_json, format_validation_error
from pruning.errors import UserError
from pruning.redact import has_credentials, is_redacted, redact_url

__all__ = ["LLMConfig", "LLMClient", "LLMReply", "LLMUnavailable"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


class LLMUnavailable(UserError):
    """The configured LLM endpoint cannot be used (raised by ``check()`` at startup)."""


class LLMConfig(BaseSettings):
    """OpenAI-compatible endpoint settings; env: AGENTIC_PRUNER_LLM_BASE_URL / _MODEL / ..., OPENAI_API_KEY.

    The API key is a ``SecretStr`` excluded from dumps and reprs; it is only ever sent as the
    ``Authorization`` header by the openai client.
    """

    model_config = SettingsConfigDict(env_prefix="AGENTIC_PRUNER_LLM_", extra="ignore", populate_by_name=True)

    base_url: str | None = Field(None, description="e.g. https://openrouter.ai/api/v1 or http://localhost:8000/v1")
    model: str | None = Field(None, description="model name served by the endpoint")
    api_key: SecretStr | None = Field(None, validation_alias=AliasChoices("OPENAI_API_KEY"), exclude=True, repr=False)
    timeout: float = Field(60.0, gt=0, description="seconds per HTTP request")
    max_retries: int = Field(2, ge=0, description="re-asks after an invalid (non-JSON / schema-violating) reply")
    http_retries: int = Field(1, ge=0, description="openai client retries on 5xx / timeouts / connection errors")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int | None = Field(1024, gt=0)
    json_mode: bool = Field(True, description="ask for response_format=json_object (dropped if the server rejects it)")
    fallback: bool = Field(True, description="when the LLM fails (unreachable at startup, HTTP errors, invalid replies "
                           "after the re-asks) answer with the heuristic and record why; False stops with one line")
    seed: int | None = None
    history_rows: int = Field(40, ge=1)

    @classmethod
    def for_endpoint(cls, base_url: str | None, model: str | None, **fields: Any) -> "LLMConfig":
        """Settings for a run's ``--llm-base-url`` / ``--llm-model`` (unset ones come from the environment).

        A URL whose credentials were redacted in the run's config (``http://***@host/v1``) is taken from
        ``AGENTIC_PRUNER_LLM_BASE_URL`` instead, where the command line put it (and a worker must have it).
        """
        if is_redacted(base_url):
            real = os.environ.get("AGENTIC_PRUNER_LLM_BASE_URL")
            if not real or redact_url(real) != base_url:
                raise LLMUnavailable(f"the credentials of LLM URL {base_url} are not stored anywhere; set "
                                     "AGENTIC_PRUNER_LLM_BASE_URL to the full URL in this process's environment")
            base_url = real
        given = {k: v for k, v in {"base_url": base_url, "model": model}.items() if v}
        return cls(**given, **fields)


@dataclass
class LLMReply(Generic[R]):
    """Outcome of :meth:`LLMClient.ask`.

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


class LLMClient:
    """One OpenAI-compatible chat endpoint: settings, client, redaction, startup check, validated asks.

    ``LLMClient(config, fallback=..., **overrides)``: ``overrides`` are :class:`LLMConfig` fields (a typo
    is a ``TypeError``); ``fallback`` overrides ``config.fallback``.
    """

    def __init__(self, config: LLMConfig | None = None, *, fallback: bool | None = None, **config_overrides: Any):
        cfg = config or LLMConfig()
        unknown = sorted(set(config_overrides) - set(LLMConfig.model_fields))
        if unknown:
            raise TypeError(f"unknown LLMConfig fields {unknown}")
        if config_overrides:
            cfg = cfg.model_copy(update=config_overrides)
        if fallback is not None:
            cfg = cfg.model_copy(update={"fallback": fallback})
        self.config = cfg
        #: ask for JSON mode; set to False for good when the server rejects ``response_format``
        self.use_response_format = cfg.json_mode
        self._openai = None

    # -- client and secrets --------------------------------------------------------------------
    def _key(self) -> str | None:
        return self.config.api_key.get_secret_value() if self.config.api_key is not None else None

    @property
    def openai(self):
        """The ``openai.OpenAI`` client (built on first use)."""
        if self._openai is None:
            from openai import OpenAI

            self._openai = OpenAI(base_url=self.config.base_url, api_key=self._key() or "no-key",
                                  timeout=self.config.timeout, max_retries=self.config.http_retries)
        return self._openai

    def redact(self, text: str | None) -> str | None:
        """``text`` with the API key replaced by ``***`` (should an endpoint echo it)."""
        key = self._key()
        if text and key and key in text:
            text = text.replace(key, "***")
        url = self.config.base_url
        if text and has_credentials(url):  # credentials in the URL: the whole userinfo, and the password alone
            text = text.replace(url, redact_url(url))
            password = urlsplit(url).password
            if password:
                text = text.replace(password, "***")
        return text

    def redacted_raw(self, raw: Sequence[str]) -> str | None:
        """All replies joined by ``---``, truncated, with the API key redacted; ``None`` when there are none."""
        return self.redact(truncate("\n---\n".join(raw))) if raw else None

    def describe(self, exc: BaseException) -> str:
        """One redacted line about a transport / HTTP error."""
        import openai

        if isinstance(exc, openai.APITimeoutError):
            what = f"request timed out after {self.config.timeout:g}s"
        elif isinstance(exc, openai.APIConnectionError):
            what = f"cannot connect to {redact_url(self.config.base_url) or 'the default endpoint'}"
        elif isinstance(exc, openai.APIStatusError):
            what = f"HTTP {exc.status_code}: {str(getattr(exc, 'message', exc)).splitlines()[0][:160]}"
        else:
            what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return self.redact(what) or what

    # -- startup check -------------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why the endpoint is unusable (``None``: usable): GET /models, or a 1-token chat call if it is missing."""
        import openai

        if not self.config.model:
            return "no LLM model configured (set AGENTIC_PRUNER_LLM_MODEL or LLMConfig(model=...))"
        try:
            models = self.openai.with_options(max_retries=0).models.list()
            ids = [m.id for m in getattr(models, "data", [])]
            if ids and self.config.model not in ids:
                return (f"model '{self.config.model}' is not served by {redact_url(self.config.base_url)}; "
                        f"available: {', '.join(ids[:10])}")
        except (openai.NotFoundError, openai.APIStatusError) as exc:
            if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
                return f"LLM endpoint refused the API key ({self.describe(exc)})"
            if getattr(exc, "status_code", None) in (404, 405, 501):
                try:  # endpoint without /models: a one-token chat call
                    self.openai.with_options(max_retries=0).chat.completions.create(
                        model=self.config.model, messages=[{"role": "user", "content": "ping"}], max_tokens=1)
                except openai.OpenAIError as exc2:
                    return f"LLM endpoint unusable: {self.describe(exc2)}"
                return None
            return f"LLM endpoint unusable: {self.describe(exc)}"
        except openai.OpenAIError as exc:
            return f"LLM endpoint unreachable: {self.describe(exc)}"
        return None

    def check(self, stacklevel: int = 2) -> str | None:
        """Startup check: ``None`` when usable; raises :class:`LLMUnavailable`, or with ``config.fallback``
        warns (``RuntimeWarning`` at ``stacklevel`` above this call) and returns the problem, so that the
        caller answers with its heuristic strategist and records why."""
        problem = self.problem()
        if problem is None:
            return None
        if self.config.fallback:
            warnings.warn(f"{problem}; falling back to the heuristic strategist", RuntimeWarning,
                          stacklevel=stacklevel + 1)
            log.warning("%s; falling back to the heuristic strategist", problem)
            return problem
        raise LLMUnavailable(problem)

    def allow_fallback(self, reason: str) -> None:
        """Called before answering with the heuristic: with fallback disabled, any LLM failure stops the
        run with one line (:class:`LLMUnavailable`) instead."""
        if not self.config.fallback:
            raise LLMUnavailable(f"{reason} (LLM fallback is disabled)")

    # -- the validated-reply loop --------------------------------------------------------------
    def _create(self, messages: list[dict[str, str]], notes: list[str]):
        """One chat completion (temperature, max_tokens, seed, JSON mode from the config). When the server
        rejects ``response_format`` with a 400, the same request is retried once without it, for good."""
        import openai

        cfg = self.config
        kwargs: dict[str, Any] = dict(model=cfg.model, messages=messages, temperature=cfg.temperature)
        if cfg.max_tokens:
            kwargs["max_tokens"] = cfg.max_tokens
        if cfg.seed is not None:
            kwargs["seed"] = cfg.seed
        if self.use_response_format:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            return self.openai.chat.completions.create(**kwargs)
        except openai.BadRequestError as exc:
            if "response_format" not in kwargs:
                raise
            # the server does not support JSON mode: ask again without it (and remember)
            self.use_response_format = False
            notes.append(f"server rejected response_format ({self.describe(exc)}); retried without it")
            kwargs.pop("response_format")
            return self.openai.chat.completions.create(**kwargs)

    def ask(self, messages: list[dict[str, str]], schema: type[M], *, reask: Callable[[str], str],
            errors: Callable[[M], Sequence[str]] | None = None,
            convert: Callable[[M], R] | None = None) -> LLMReply[R]:
        """Ask until a reply validates into ``schema``; at most ``1 + config.max_retries`` asks.

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
        while attempts <= self.config.max_retries:
            attempts += 1
            try:
                resp = self._create(messages, notes)
            except openai.OpenAIError as exc:
                return LLMReply(None, raw, notes, attempts, f"LLM request failed: {self.describe(exc)}",
                                self.redacted_raw(raw))
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
                                attempts, None, self.redacted_raw(raw))
            notes.append(f"attempt {attempts}: {last_error}")
            messages.append({"role": "assistant", "content": content})
            messages.append({"role": "user", "content": reask(last_error)})
        return LLMReply(None, raw, notes, attempts, f"invalid LLM output after {attempts} attempts: {last_error}",
                        self.redacted_raw(raw))
