"""The embedded default LLM: a tiny Qwen3-architecture causal LM trained on real text that ships with Python.

* Text: the docstrings (``inspect.getdoc``) of a fixed list of standard-library modules and of their
  public classes, functions and methods, in a deterministic order (module list order, then names
  sorted), de-duplicated. About 0.5 MB of English technical prose; no download.
* Split by document: every 20th document (offset 0) is *validation* (what the pruning agent measures
  after each step and rolls back on), every 20th (offset 10) is *test* (reported only), the rest is
  *train* (training and calibration).
* Tokenizer: :class:`ByteTokenizer`, bytes 0-255 plus ``<pad>``, ``<bos>``, ``<eos>`` (vocab 259).
* Model: ``Qwen3ForCausalLM`` (hidden 128, 4 layers, 4 query heads over 2 key/value heads = GQA,
  head_dim 32, SwiGLU 384, tied embeddings), AdamW with warm-up + cosine decay, a fixed number of steps
  (deterministic for a seed; ~1-2 minutes on 2 CPU cores).
* Cache: ``$AGENTIC_PRUNER_CACHE/llm/<key>/`` (default ``~/.cache/agentic-pruner/llm/<key>/``), a
  ``save_pretrained`` directory plus ``byte_tokenizer.json`` and ``training.json`` (random-init and
  trained perplexity on validation and test, seconds, steps).

:func:`load_causal_lm` loads any Hugging Face causal LM from a local directory (this one included), in
a given dtype and onto a given device. The tiny model is always *trained* on the CPU (fixed seed, so the
cached weights are the same on every machine); a CUDA run then loads it in bf16 onto the GPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pruning.errors import UserError

__all__ = [
    "ByteTokenizer", "HFTokenizer", "TinyLMConfig", "ModelNotFound", "CorpusSplits", "STDLIB_MODULES",
    "corpus_documents", "split_documents", "corpus_splits", "token_stream", "llm_cache_dir",
    "build_tiny_model", "train_tiny_model", "load_tiny_model", "load_causal_lm", "load_tokenizer",
    "tokenize_splits",
]

#: Modules whose docstrings form the corpus (order matters: it fixes the document order).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib",
    "importlib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox",
    "math", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "pkgutil", "platform", "poplib", "pprint", "profile", "pydoc", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
    "zipimport",
)
CACHE_ENV = "AGENTIC_PRUNER_CACHE"
TOKENIZER_FILE = "byte_tokenizer.json"
INFO_FILE = "training.json"


class ModelNotFound(UserError, FileNotFoundError):
    """No loadable causal LM at the given local path (one-line message)."""


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes 0-255 plus three specials; no vocabulary file, no download."""

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({"type": "byte", "vocab_size": self.vocab_size, "pad": self.pad_token_id,
                                    "bos": self.bos_token_id, "eos": self.eos_token_id}, indent=2))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "ByteTokenizer":
        data = json.loads((Path(directory) / TOKENIZER_FILE).read_text())
        if data.get("type") != "byte" or int(data.get("vocab_size", 0)) != cls.vocab_size:
            raise ValueError(f"{directory}/{TOKENIZER_FILE} is not a byte tokenizer of vocab {cls.vocab_size}")
        return cls()


class HFTokenizer:
    """Thin adapter giving a Hugging Face tokenizer the :class:`ByteTokenizer` interface."""

    name = "hf"

    def __init__(self, tok: Any):
        self.tok = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=False))
        if add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if add_eos and self.eos_token_id is not None:
            ids = ids + [self.eos_token_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(model_path: str | os.PathLike[str]):
    """:class:`ByteTokenizer` when the directory has ``byte_tokenizer.json``, else its HF tokenizer."""
    path = Path(model_path)
    if (path / TOKENIZER_FILE).is_file():
        return ByteTokenizer.load(path)
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a transformers traceback
        raise ModelNotFound(f"no tokenizer in {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc


@contextlib.contextmanager
def _quiet_progress():
    """No transformers progress bars (loading / writing shards) for the duration; restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_causal_lm(model_path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                   with_tokenizer: bool = True, device: str | torch.device | None = None):
    """Load a Hugging Face causal LM (``AutoModelForCausalLM``) from a local directory, eval mode.

    The weights are read straight into ``dtype`` (bf16 halves the host memory of a fp32 checkpoint and keeps
    transformers' own fp32 buffers such as rotary frequencies), then moved to ``device`` (None: stays on the
    CPU). Returns ``(model, tokenizer)`` (tokenizer None when ``with_tokenizer=False``). Raises
    :class:`ModelNotFound` with one line when the directory is missing or holds no loadable model.
    """
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json (expected a save_pretrained directory of a causal LM)")
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFound(f"cannot load a causal LM from {path}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    model.eval()
    if device is not None and torch.device(device) != torch.device("cpu"):
        model.to(device)
    return model, (load_tokenizer(path) if with_tokenizer else None)


# ------------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------------
def _docs_of(module_name: str) -> list[str]:
    mod = importlib.import_module(module_name)
    out: list[str] = []

    def add(obj: Any) -> None:
        d = inspect.getdoc(obj)
        if d and len(d) >= 40:
            out.append(d.strip())

    add(mod)
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = vars(mod)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or getattr(obj, "__module__", None) != mod.__name__:
            continue
        add(obj)
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                member = vars(obj)[mname]
                if not mname.startswith("_") and inspect.isfunction(member):
                    add(member)
    return out


def corpus_documents(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """De-duplicated docstrings of ``modules`` in a deterministic order (unimportable modules skipped)."""
    docs: dict[str, None] = {}
    for name in modules:
        try:
            for d in _docs_of(name):
                docs.setdefault(d, None)
        except Exception:  # noqa: BLE001 - a module missing on this platform is skipped
            continue
    return list(docs)


@dataclass(frozen=True)
class CorpusSplits:
    train: list[str]
    val: list[str]
    test: list[str]

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.val, self.test):
            h.update(json.dumps(part).encode())
        return h.hexdigest()[:12]


def split_documents(docs: Sequence[str], every: int = 20) -> CorpusSplits:
    """Document i goes to val when i % every == 0, to test when i % every == every // 2, else train."""
    train, val, test = [], [], []
    for i, d in enumerate(docs):
        r = i % every
        (val if r == 0 else test if r == every // 2 else train).append(d)
    return CorpusSplits(train, val, test)


def corpus_splits() -> CorpusSplits:
    return split_documents(corpus_documents())


def token_stream(docs: Sequence[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """One 1-D LongTensor: ``<bos> doc <eos>`` for every document, concatenated (optionally truncated)."""
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d, add_bos=tokenizer.bos_token_id is not None,
                                    add_eos=tokenizer.eos_token_id is not None))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    t = torch.tensor(ids, dtype=torch.long)
    return t[:max_tokens] if max_tokens is not None else t


def tokenize_splits(tokenizer, splits: CorpusSplits | None = None) -> dict[str, torch.Tensor]:
    splits = splits or corpus_splits()
    return {"train": token_stream(splits.train, tokenizer), "val": token_stream(splits.val, tokenizer),
            "test": token_stream(splits.test, tokenizer)}


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyLMConfig:
    """Architecture and training recipe of the embedded model (every field is part of the cache key)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.05
    seed: int = 0
    eval_tokens: int = 32768  # tokens of val/test used for the perplexities in training.json

    def __post_init__(self):
        if self.num_kv_heads >= self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("GQA needs num_kv_heads < num_heads and num_heads % num_kv_heads == 0")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return f"qwen3-tiny-h{self.hidden_size}-l{self.num_layers}-s{self.steps}-seed{self.seed}-{digest}"


def llm_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "agentic-pruner"
    return base / "llm"


def build_tiny_model(cfg: TinyLMConfig = TinyLMConfig()):
    """A randomly initialised ``Qwen3ForCausalLM`` of the given shape (seeded)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = ByteTokenizer()
    config = Qwen3Config(
        vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads, max_position_embeddings=max(256, cfg.seq_len),
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(config)
    model.eval()
    return model


def train_tiny_model(cfg: TinyLMConfig = TinyLMConfig(), cache_dir: str | os.PathLike[str] | None = None, *,
                     force: bool = False, progress: Callable[[int, int, float], Any] | None = None) -> Path:
    """Train (once) and cache the tiny model; return its ``save_pretrained`` directory."""
    from pruning.llm.perplexity import perplexity

    cache = Path(cache_dir).expanduser() if cache_dir is not None else llm_cache_dir()
    out = cache / cfg.key()
    if (out / INFO_FILE).is_file() and not force:
        return out
    tok = ByteTokenizer()
    splits = corpus_splits()
    data = tokenize_splits(tok, splits)
    model = build_tiny_model(cfg)
    eval_kw = dict(seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens)
    random_val = perplexity(model, data["val"], **eval_kw)
    random_test = perplexity(model, data["test"], **eval_kw)

    gen = torch.Generator().manual_seed(cfg.seed)
    train = data["train"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    losses = []
    offs = torch.arange(cfg.seq_len + 1)
    for step in range(cfg.steps):
        starts = torch.randint(0, len(train) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = train[starts[:, None] + offs]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, cfg.steps, losses[-1])
    model.eval()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    info = {
        "config": asdict(cfg), "key": cfg.key(), "corpus_digest": splits.digest(),
        "corpus_documents": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "corpus_tokens": {k: int(len(v)) for k, v in data.items()},
        "params": sum(p.numel() for p in model.parameters()),
        "random_init_ppl": {"val": random_val, "test": random_test},
        "trained_ppl": {"val": perplexity(model, data["val"], **eval_kw),
                        "test": perplexity(model, data["test"], **eval_kw)},
        "final_train_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "train_seconds": round(seconds, 2), "train_cpu_seconds": round(cpu_seconds, 2),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = cache / f".{cfg.key()}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with _quiet_progress():
        model.save_pretrained(str(tmp))
    tok.save(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: a concurrent reader never sees half a directory
    return out


def load_tiny_model(cfg: TinyLMConfig = TinyLMConfig(), cache_dir: str | os.PathLike[str] | None = None, *,
                    train_if_missing: bool = True, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None):
    """``(model, tokenizer, info)`` of the embedded default, training it first (on the CPU) when not cached."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else llm_cache_dir()
    path = cache / cfg.key()
    if not (path / INFO_FILE).is_file():
        if not train_if_missing:
            raise ModelNotFound(f"tiny model not cached at {path}")
        path = train_tiny_model(cfg, cache)
    model, tok = load_causal_lm(path, dtype=dtype, device=device)
    info = json.loads((path / INFO_FILE).read_text())
    info["path"] = str(path)
    return model, tok, info
