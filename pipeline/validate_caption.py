"""Validation of LLM caption candidates: pure functions, no model, no Ray.

An LLM output becomes a candidate only if it reads like a caption: complete (not cut at
`max_tokens`), not empty, within length bounds, not an echo of the prompt or of the original
caption, no chat markup, no instructions and no refusals. Reasoning models' `<think>...</think>`
blocks are removed first; a block that never closes means the answer is reasoning, not a
caption. Every rejected output leaves its reason code in `candidate_rejects`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from schemas.tables import CANDIDATE_REJECT_REASONS as REASONS  # noqa: F401 - the reason codes
from schemas.tables import REJECT_CHAT_MARKUP as CHAT_MARKUP
from schemas.tables import REJECT_DUPLICATE as DUPLICATE
from schemas.tables import REJECT_ECHO_ORIGINAL as ECHO_ORIGINAL
from schemas.tables import REJECT_ECHO_PROMPT as ECHO_PROMPT
from schemas.tables import REJECT_EMPTY as EMPTY
from schemas.tables import REJECT_INSTRUCTIONS as INSTRUCTIONS
from schemas.tables import REJECT_LLM_ERROR as LLM_ERROR  # noqa: F401
from schemas.tables import REJECT_REFUSAL as REFUSAL
from schemas.tables import REJECT_THINKING as THINKING
from schemas.tables import REJECT_TOO_LONG as TOO_LONG
from schemas.tables import REJECT_TOO_SHORT as TOO_SHORT
from schemas.tables import REJECT_TRUNCATED as TRUNCATED

_CHAT_MARKUP = re.compile(
    r"<\|[^|<>]{0,40}\|>"  # <|im_start|>, <|eot_id|>, <|assistant|>
    r"|</?s>|\[/?INST\]|<<SYS>>|<</SYS>>"
    r"|^\s*#{0,3}\s*(system|user|assistant|human|ai)\s*:"  # role labels
    r"|(\n|[.!?]\s)\s*(system|user|assistant|human)\s*:",  # a second turn
    re.IGNORECASE | re.MULTILINE,
)
_REFUSAL = re.compile(
    r"\b(i\s+(cannot|can't|can not|won't|am unable|'m unable|am not able)|"
    r"i'?m sorry|i apologi[sz]e|as an ai\b|as a language model|an ai language model|"
    r"i do not have (access|the ability)|i don't have (access|the ability))",
    re.IGNORECASE,
)
_INSTRUCTIONS = re.compile(
    r"\b(ignore|disregard|forget)\b.{0,40}\b(instructions?|prompts?|rules?|above|previous|prior)\b"
    r"|\bsystem prompt\b|\bjailbreak\b"
    r"|\b(write|generate|produce|give me|respond with|reply with|output)\b.{0,30}\b(caption|description|answer|response|text)\b"
    r"|\b(you must|you should|you are (now )?a|your task is|please (write|describe|provide|respond))\b"
    r"|^\s*(here is|here's|sure[,!]|certainly[,!]|okay[,!])",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^\s*(new |rewritten |refined |improved )?(caption|description)\s*[:\-]\s*", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class ValidationConfig:
    """Bounds for a usable caption."""

    min_words: int = 3
    max_words: int = 60
    max_chars: int = 400
    echo_overlap: float = 0.9  # share of a candidate's words found in order in the prompt

    def __post_init__(self):
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if not 0.0 < self.echo_overlap <= 1.0:
            raise ValueError(f"echo_overlap must be in (0, 1], got {self.echo_overlap}")


def strip_thinking(text: str | None) -> tuple[str, bool]:
    """`text` without its reasoning, and whether a `<think>` block was left open (the answer
    is then reasoning cut off, not a caption). Closed blocks are removed; a `</think>` with no
    opening tag (templates that open the block inside the prompt, as DeepSeek-R1's does) ends
    the reasoning too: what precedes it is dropped."""
    text = _THINK_BLOCK.sub(" ", text or "")
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end() :]
    return text, bool(_THINK_OPEN.search(text))


def clean(text: str | None) -> str:
    """Normalise what an LLM returned: Unicode NFC, whitespace, a leading label, outer quotes."""
    if text is None:
        return ""
    text = unicodedata.normalize("NFC", text).replace("\x00", "")
    text = " ".join(text.split())
    text = _LABEL.sub("", text, count=1)
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]")


def clean_original(text: str | None, cfg: ValidationConfig) -> tuple[str, bool]:
    """An original caption made safe for a prompt: chat markup and control or invisible
    characters removed, whitespace folded, cut at a word boundary to `cfg.max_chars`. Returns
    (text, whether anything was changed beyond whitespace)."""
    raw = unicodedata.normalize("NFC", text or "")
    out = _CONTROL.sub(" ", raw)
    out = _CHAT_MARKUP.sub(" ", out)
    out = " ".join(out.split())
    if len(out) > cfg.max_chars:
        cut = out[: cfg.max_chars + 1]
        out = (cut.rsplit(" ", 1)[0] if " " in cut else cut[: cfg.max_chars]).rstrip(" ,;:-")
    return out, out != " ".join(raw.split())


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _contained(needle: list[str], haystack: list[str]) -> bool:
    """Whether `needle` occurs as a contiguous run of words in `haystack`."""
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _ngram_share(words: list[str], haystack: list[str], n: int = 4) -> float:
    """Share of the candidate's word n-grams that also occur in `haystack`."""
    if len(words) < n:
        return 1.0 if _contained(words, haystack) else 0.0
    grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    hay = {tuple(haystack[i : i + n]) for i in range(len(haystack) - n + 1)}
    return len(grams & hay) / len(grams)


def check(text: str, original: str, prompt: str, cfg: ValidationConfig) -> str:
    """The reason `text` (already cleaned) is not a usable caption, or "" when it is."""
    if not text or not _WORD.search(text):
        return EMPTY
    if _CHAT_MARKUP.search(text):
        return CHAT_MARKUP
    if _REFUSAL.search(text):
        return REFUSAL
    if _INSTRUCTIONS.search(text):
        return INSTRUCTIONS
    words = _words(text)
    orig_words = _words(original)
    if orig_words and (words == orig_words or _contained(words, orig_words)):
        return ECHO_ORIGINAL
    if len(words) < cfg.min_words:
        return TOO_SHORT
    if len(words) > cfg.max_words or len(text) > cfg.max_chars:
        return TOO_LONG
    if _ngram_share(words, _words(prompt)) >= cfg.echo_overlap:
        return ECHO_PROMPT
    return ""


def validate(outputs: list[str | None], original: str, prompt: str, cfg: ValidationConfig,
             truncated: list[bool] | None = None) -> tuple[list[str], list[str]]:
    """Split raw LLM outputs into kept candidates and reject reasons (in output order).

    `prompt` is the full text the LLM saw minus the original caption's own words, so a
    candidate that copies the instructions or the few-shot examples counts as an echo.
    `truncated[i]` says output i stopped at the token limit (finish reason `length`): it is
    rejected `truncated`, or `thinking` when what was cut off is an open reasoning block.
    """
    kept: list[str] = []
    rejects: list[str] = []
    seen: set[tuple[str, ...]] = set()
    truncated = truncated or [False] * len(outputs)
    for raw, cut in zip(outputs, truncated, strict=True):
        answer, open_thinking = strip_thinking(raw)
        text = clean(answer)
        reason = THINKING if open_thinking else TRUNCATED if cut else check(text, original, prompt, cfg)
        if not reason:
            key = tuple(_words(text))
            if key in seen:
                reason = DUPLICATE
            else:
                seen.add(key)
        if reason:
            rejects.append(reason)
        else:
            kept.append(text)
    return kept, rejects
