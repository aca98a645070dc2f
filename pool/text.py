"""Text from outside (item keys, park reasons, error texts, member names) made safe to print.

Data flow: whatever the CLI prints that it did not write itself goes through ``escape``
(human-readable lines) or ``json_safe`` (JSON it prints) just before it is printed. A key
is anyone's string: a publisher can put an ESC sequence that repaints the operator's
terminal, a newline that forges a log line, or a bidi override that shows ``evil.exe``
as ``exe.live`` into it. Those characters come out as visible escapes (``\\x1b``,
``\\n``, ``\\u202e``); everything else, including backslashes, is left as it is, so text
already escaped once (a ``repr``) reads the same.
"""

from __future__ import annotations

import re

# C0 controls and DEL, C1 controls (0x9b is a one-byte CSI to some terminals), the Arabic
# letter mark, LRM/RLM, the line and paragraph separators (newlines to some viewers), the
# bidi embeddings/overrides U+202A-U+202E and the bidi isolates U+2066-U+2069.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
# The same less C0: a JSON encoder escapes those inside strings already, and outside them the
# only ones are the indentation's newlines and spaces, which must stay.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(m: re.Match[str]) -> str:
    c = m.group()
    return _SHORT.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: object) -> str:
    """``str(text)`` on one line, its control and bidi characters written as ``\\x1b``, ``\\n``, ``\\u202e``."""
    return _UNSAFE.sub(_visible, str(text))


def json_safe(text: str) -> str:
    """Encoded JSON with the same characters (bar C0, see above) as ``\\u`` escapes: the same JSON, safe to show.

    They can only occur inside JSON strings, and there ``\\uXXXX`` means the character itself.
    """
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
