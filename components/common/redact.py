"""Secrets never leave the process: one redactor for everything a config or a message becomes
outside it (MLflow params, tags and artifacts, manifests, summaries, logs, printed output, job
payloads).

Three rules, applied together by ``redact`` (nested dicts/lists/strings) and ``redact_text``:

- **by key**: a dict key whose name looks secret hides its whole value as ``***``. Names are split
  into words (``MY_SERVICE_TOKEN``, ``myServiceToken``, ``service-token`` → ``my service token``);
  a key is secret if it contains password, passwd, secret, credential, api key, access key,
  private key, session token or auth token, or has the word ``token``, ``auth`` or
  ``authorization``. Whole words for those three, so ``max_tokens``, ``tokenizer`` and ``author``
  stay readable.
- **by value**: URL userinfo (``https://user:pass@host`` → ``https://***@host``, also inside longer
  text), tokens of known shapes (AWS key ids, GitHub, Hugging Face, Slack, OpenAI-style ``sk-``,
  JWTs, ``Bearer …``), and generic high-entropy strings.
- **by environment**: the value of every environment variable whose name looks secret (the key
  rule) is hidden wherever it appears as a substring. Values under 8 characters are left alone
  (the moto dummy ``testing`` would otherwise eat every occurrence of the word, and redaction does
  not protect a secret that short anyway), and so are variables that only say where or how a secret
  is used (``*_PATH``, ``*_FILE``, ``*_DIR``, ``*_MODE``, ``*_TYPE``, ``*_SOCK``: e.g.
  ``RAY_AUTH_TOKEN_PATH``, ``SSH_AUTH_SOCK``), whose values are paths and settings that appear in
  ordinary output.

What latentflow writes itself is kept: sha256 digests and cache keys (64 hex), git commits (40
hex), MLflow run ids (32 hex) and uuids are all single-case hex, and the generic rule only takes
a run of 32+ characters from ``[A-Za-z0-9+_-]`` that mixes upper case, lower case and digits and
carries at least 4.2 bits of entropy per character (random base64 of that length: ~4.5; words
joined by underscores: ~4.0). ``/`` ends a run, so mixed-case paths are not mistaken for tokens
(an AWS secret key, which may hold ``/``, is caught by the key and environment rules instead).
As a second guard, values under digest-like keys (``sha256``, ``digest``, ``cache_key``,
``upstream``, ``git_commit``, ``*run_id``, ...) skip the generic rule; the other rules still apply.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import sys
from typing import Any

MASK = "***"

_SUBSTRING_WORDS = re.compile(r"password|passwd|secret|credential|api_?key|access_?key|private_?key"
                              r"|session_?token|auth_?token")
_WHOLE_WORDS = {"token", "auth", "authorization"}
_DIGEST_KEYS = re.compile(r"(^|_)(sha\d*|md5|digest|checksum|etag|cache_key|upstream|git_commit|commit"
                          r"|run_ids?|workflow_id|submission_id|fingerprint)$")
_POINTER_SUFFIXES = ("_path", "_file", "_dir", "_mode", "_type", "_sock")
MIN_ENV_SECRET_CHARS = 8

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_KNOWN_TOKENS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,}\b"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style API keys
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
]
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_LONG_RUN = re.compile(r"(?<![A-Za-z0-9+_-])[A-Za-z0-9+_-]{32,}={0,2}(?![A-Za-z0-9+_=-])")
MIN_TOKEN_ENTROPY = 4.2


def _words(name: str) -> str:
    """``myServiceToken`` / ``MY-SERVICE.TOKEN`` -> ``my_service_token``."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def is_secret_key(name: Any) -> bool:
    words = _words(name)
    return bool(_SUBSTRING_WORDS.search(words)) or bool(_WHOLE_WORDS & set(words.split("_")))


def _is_digest_key(name: Any) -> bool:
    return bool(_DIGEST_KEYS.search(_words(name)))


def _env_secrets() -> list[str]:
    """Values of secret-named environment variables, longest first (so a secret that contains
    another is hidden whole). Read at each call: tests and jobs change the environment."""
    values = {value for name, value in os.environ.items()
              if is_secret_key(name) and not _words(name).endswith(_POINTER_SUFFIXES)
              and len(value) >= MIN_ENV_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def _entropy(text: str) -> float:
    counts = collections.Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _looks_random(run: str) -> bool:
    mixed = re.search(r"[A-Z]", run) and re.search(r"[a-z]", run) and re.search(r"[0-9]", run)
    return bool(mixed) and _entropy(run) >= MIN_TOKEN_ENTROPY


def _mask_random(match: re.Match) -> str:
    return MASK if _looks_random(match.group(0)) else match.group(0)


def redact_text(text: str, generic: bool = True) -> str:
    """``text`` with URL userinfo, token-looking strings and secret env values replaced by ``***``.
    ``generic=False`` skips the high-entropy rule (for values under digest-like keys)."""
    if not isinstance(text, str) or not text:
        return text
    for secret in _env_secrets():
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    for pattern in _KNOWN_TOKENS:
        text = pattern.sub(MASK, text)
    return _LONG_RUN.sub(_mask_random, text) if generic else text


def redact_command(args: list[str]) -> str:
    """A command line fit to record: ``key=value`` arguments (``--set ray.env_vars.MY_TOKEN=...``)
    whose key names a secret have the value masked, and the rest goes through :func:`redact_text`."""
    def one(arg: str) -> str:
        parts = arg.split("=")  # "--set=a.b.MY_TOKEN=v" as well as "a.b.MY_TOKEN=v"
        for i, part in enumerate(parts[:-1]):
            if is_secret_key(part.rsplit(".", 1)[-1]):
                return "=".join(parts[:i + 1]) + "=" + MASK
        return arg
    return redact_text(" ".join(one(a) for a in args))


def redact(value: Any, generic: bool = True) -> Any:
    """A copy of ``value`` (nested dicts, lists, tuples, strings) with every secret replaced."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(k) else redact(v, generic and not _is_digest_key(k))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, generic) for v in value]
    if isinstance(value, str):
        return redact_text(value, generic)
    return value


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """What a manifest, an MLflow run or a summary may record of a config."""
    return redact(config)


def find_secrets(value: Any, path: str = "") -> list[str]:
    """Dotted paths in ``value`` that redaction would change: for refusing, naming the key and
    never the value."""
    if isinstance(value, dict):
        return [p for k, v in value.items()
                for p in ([f"{path}{k}"] if is_secret_key(k) else find_secrets(v, f"{path}{k}."))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in find_secrets(v, f"{path}{i}.")]
    return [path.rstrip(".")] if isinstance(value, str) and redact_text(value) != value else []


class RedactingFilter(logging.Filter):
    """Redacts a record's message, args and traceback; never drops a record. Install it on handlers
    (``handler.addFilter``) or process-wide with ``install_log_redaction``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: logging reports it at emit, not here
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when set, so the redacted traceback is what gets written.
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


class RedactingStream:
    """A text stream that redacts each write, delegating everything else to the stream it wraps.
    For output that never passes through logging: MLflow writes "View run ... at: <tracking URI>"
    straight to stdout, and a Ray driver prints its workers' output lines. Text split across two
    writes is not seen whole, and writes to the file descriptor underneath bypass it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            safe = redact_text(text)
        except Exception:  # noqa: BLE001 - at interpreter shutdown (a progress bar's last line): drop it
            return len(text)  # rather than print it unredacted
        self._stream.write(safe)
        return len(text)  # what the caller gave: callers count their own characters

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def install_output_redaction() -> None:
    """Wrap this process's stdout and stderr, once."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process, once. A filter on the root's handlers would miss
    the handlers Ray and MLflow attach to their own non-propagating loggers when first imported,
    so the filter runs in the record factory, which every logger goes through."""
    global _installed
    if _installed:
        return
    make_record, redacting = logging.getLogRecordFactory(), RedactingFilter()

    def factory(*args, **kwargs):
        record = make_record(*args, **kwargs)
        redacting.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
