"""User text as text: one place that makes a string from the command line safe to tokenise.

A question typed in a non-UTF-8 locale, or given as bytes that are not UTF-8, reaches Python as a
string with lone surrogates (``surrogateescape``: byte 0xE9 -> U+DCE9); the tokenizers refuse such
strings with a ``TypeError``. ``user_text`` replaces every byte that is not UTF-8 with U+FFFD (the
replacement character), so the question is still answered and the damage is visible in the
output; every other character, including markup- or token-like text, is kept as typed.
"""

from __future__ import annotations

import re
import unicodedata


def user_text(s: str) -> str:
    """``s`` with every undecodable byte (lone surrogate) replaced by U+FFFD; other text unchanged."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:  # surrogateescape'd bytes (argv, file names): back to bytes, then decode with replacement
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # other lone surrogates (e.g. from "\\ud800" in JSON)
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s)


def question_text(q: str) -> str:
    """The question as plain text: stripped, not empty (a ``UsageError``), and every byte that is
    not UTF-8 (a question typed in another encoding) replaced by U+FFFD (``user_text``)."""
    from zoocli.errors import UsageError

    if not isinstance(q, str) or not q.strip():
        raise UsageError("the question is empty")
    return user_text(q.strip())


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 new token``, ``2 new tokens`` (``many``: an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


_FFFD_RUN = re.compile("\ufffd{2,}")


def shown(s: str) -> str:
    """``s`` as a table or panel shows it: control and format characters (a raw 0x03, a
    right-to-left override) escaped as ``\\x03`` / ``\\u202e``, a run of replacement characters
    (what a model's undecodable bytes become) as ``\\ufffd x12``; newlines and tabs kept. The
    raw text stays in --json."""
    out = []
    for c in s:
        if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(c)
        else:
            out.append(c.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return _FFFD_RUN.sub(lambda m: f"\\ufffd x{len(m.group(0))}", "".join(out))
