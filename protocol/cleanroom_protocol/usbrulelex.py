"""Tokens of USBGuard's rule language (usbguard-rules.conf(5)); pure, no I/O.

What USBGuard's grammar (``src/Library/RuleParser/Grammar.hpp``) and its string decoder
(``Utility::unescapeString``) allow, and nothing more:

* blanks are spaces and tabs; a line break anywhere ends the rule (USBGuard reads one rule per line);
* strings are double-quoted only; inside, any character but CR/LF, and the escapes ``\\"``, ``\\\\`` and
  ``\\xHH`` (one byte). USBGuard's grammar also lets ``\\n``, ``\\t``, ``\\0``, ``\\123``… through, but its
  decoder then refuses them as "Unknown escape sequence", so they are refused here at once. Braces, ``#``
  and blanks inside a string are literal;
* a word is a run of anything else but blanks, quotes, braces and ``#``; ``#`` starts a comment that runs
  to the end of the rule;
* ``{`` and ``}`` group a set. Whether a blank is *required* between two tokens (``serial "a"`` but not
  ``serial"a"``; ``{"a" "b"}`` but not ``{"a""b"}``) is the parser's business: every token records
  whether blanks preceded it.

Values are bytes, as in USBGuard: a string may hold any byte through ``\\xHH``; other characters are
UTF-8 encoded. Columns are 1-based character positions in the rule text.

Speed: a policy may hold 1024 rules of 4096 characters. A set whose body is a well-formed list of
strings or of words is lexed as one :data:`SET` token by a single regular expression (its values decoded
in bulk), so long sets cost C-level scanning, not one Python step per value; anything else falls back to
one token at a time, which is also where errors are located.
"""

from __future__ import annotations

import codecs
import re
from enum import Enum
from operator import itemgetter

MAX_RULE_CHARS = 4096  # the policy model's cap per rule (protocol policy.py, UsbSection.rules)


class TokenKind(Enum):
    WORD = "word"
    STRING = "string"
    LBRACE = "{"
    RBRACE = "}"
    SET = "set"  # a whole well-formed { … } group
    END = "end of rule"  # end of text or a comment


class Token:
    """One token. A plain slotted class: a policy at the size caps makes tens of thousands of these."""

    __slots__ = ("end", "kind", "spaced", "start", "strings", "text", "value", "words")

    def __init__(
        self,
        kind: TokenKind,
        start: int,
        end: int,
        spaced: bool,
        text: str,
        value: bytes = b"",
        words: tuple[str, ...] = (),
        strings: tuple[bytes, ...] = (),
    ) -> None:
        self.kind = kind
        self.start = start  # 0-based offset of the first character
        self.end = end  # 0-based offset after the last character
        self.spaced = spaced  # blanks (or the start of the rule) before it
        self.text = text  # the source text of the token
        self.value = value  # STRING: the decoded bytes
        self.words = words  # SET of words
        self.strings = strings  # SET of strings

    @property
    def column(self) -> int:
        return self.start + 1

    def __repr__(self) -> str:
        return f"Token({self.kind.name}, {self.start}, {self.text!r})"


class RuleSyntaxError(ValueError):
    """Malformed rule text; ``column`` (1-based) points at the offending character."""

    def __init__(self, column: int, message: str) -> None:
        super().__init__(message)
        self.column = column
        self.message = message


_WORD_RE = r'[^ \t"{}#\r\n]++'
# A valid string, unrolled ("normal* (escape normal*)*") with possessive quantifiers (nothing here ever
# needs to backtrack) so that long strings and sets scan at C speed.
_STRING_RE = r'"[^"\\\r\n]*+(?:\\(?:["\\]|x[0-9A-Fa-f]{2})[^"\\\r\n]*+)*+"'
_TOKEN = re.compile(
    r"[ \t]*+(?:"
    rf"(?P<word>{_WORD_RE})"
    rf"|(?P<string>{_STRING_RE})"
    rf"|(?P<words>\{{[ \t]*+(?P<words_body>{_WORD_RE}(?:[ \t]++{_WORD_RE})*+)[ \t]*+\}})"
    rf"|(?P<strings>\{{[ \t]*+(?P<strings_body>{_STRING_RE}(?:[ \t]++{_STRING_RE})*+)[ \t]*+\}})"
    r"|(?P<lbrace>\{)|(?P<rbrace>\})|(?P<comment>\#.*)|(?P<end>\Z)|(?P<bad>.))",
    re.S,
)
_WORD = re.compile(_WORD_RE)
_STRING = re.compile(_STRING_RE)
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_SIMPLE_KINDS = {
    "word": TokenKind.WORD,
    "lbrace": TokenKind.LBRACE,
    "rbrace": TokenKind.RBRACE,
    "comment": TokenKind.END,
    "end": TokenKind.END,
}
_first = itemgetter(0)


def unescape(raw: bytes) -> bytes:
    """The bytes of a string body whose escapes are known to be valid (``\\"``, ``\\\\``, ``\\xHH``, as
    the token expression checked): Python's bytes-literal decoder does exactly that, at C speed."""
    return codecs.escape_decode(raw)[0] if b"\\" in raw else raw


# Delimiter markers for bulk decoding: bytes whose \xHH spelling has no letters, so one spelling only.
_MARKERS = [bytes([b]) for b in range(256) if f"{b:02x}".isdigit() and b not in (0x22, 0x5C)]


def _set_strings(body: bytes) -> tuple[bytes, ...]:
    """The decoded strings of a set body known to be well-formed (strings with valid escapes separated
    by blanks). Done in bulk, because a 4096-character set may hold hundreds of strings. Escapes are
    parsed left to right, so rewriting backslash pairs, then escaped quotes, as ``\\xHH`` leaves raw
    quotes only as delimiters; those become a marker byte that occurs nowhere else in the body (neither
    raw nor escaped), the whole body is decoded at once and split at the markers."""
    if b"\\" not in body:  # no escapes, so no quote inside a string: every other piece is a body
        return tuple(body.split(b'"')[1::2])
    body = body.replace(b"\\\\", b"\\x5c").replace(b'\\"', b"\\x22")
    marker = next((m for m in _MARKERS if m not in body and b"\\x%02x" % m[0] not in body), None)
    if marker is None:  # every candidate byte is in use (contrived): decode string by string
        return tuple(map(_first, map(codecs.escape_decode, body.split(b'"')[1::2])))
    return tuple(codecs.escape_decode(body.replace(b'"', marker))[0].split(marker)[1::2])


def escape(value: bytes) -> str:
    """A string body as USBGuard writes it (``Utility::escapeString``): ``"`` and ``\\`` escaped, every
    byte outside printable ASCII (C locale) as ``\\xHH``. The result parses back to ``value``."""
    out: list[str] = []
    for byte in value:
        if byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        elif 0x20 <= byte <= 0x7E:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def quote(value: bytes) -> str:
    return '"' + escape(value) + '"'


def check_text(text: str) -> None:
    """Refuse what can never be a rule line before lexing: over-long text, text that is not encodable
    Unicode (a lone surrogate from a JSON document)."""
    if len(text) > MAX_RULE_CHARS:
        raise RuleSyntaxError(MAX_RULE_CHARS + 1, f"rule longer than {MAX_RULE_CHARS} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RuleSyntaxError(exc.start + 1, "not valid Unicode text (lone surrogate)") from None


class Lexer:
    """Tokens on demand (the parser stops at the first unsupported construct, before lexing what follows
    it, so ``if localtime(…)`` is named as a condition rather than as whatever lexing error it holds).
    One regular expression finds each token; a well-formed set is one token."""

    def __init__(self, text: str) -> None:
        check_text(text)
        self.text = text
        self._pos = 0

    def next(self) -> Token:
        pos = self._pos
        match = _TOKEN.match(self.text, pos)
        assert match is not None  # the last alternatives match anything
        kind = match.lastgroup or "bad"
        start = match.start(kind)
        end = self._pos = match.end()
        spaced = start > pos or start == 0
        text = match.group(kind)
        if kind == "string":
            value = unescape(text[1:-1].encode("utf-8"))
            return Token(TokenKind.STRING, start, end, spaced, text, value=value)
        if kind == "words":
            # The body is words separated by spaces and tabs (checked by the expression); str.split()
            # would also split at other whitespace (\v, NBSP…) that a word may contain.
            words = tuple(filter(None, match.group("words_body").replace("\t", " ").split(" ")))
            return Token(TokenKind.SET, start, end, spaced, text, words=words)
        if kind == "strings":
            strings = _set_strings(match.group("strings_body").encode("utf-8"))
            return Token(TokenKind.SET, start, end, spaced, text, strings=strings)
        if kind == "bad":
            self._pos = pos
            if text == '"':
                raise self._string_error(start)
            raise RuleSyntaxError(start + 1, "line break inside a rule (one rule per entry)")
        return Token(_SIMPLE_KINDS[kind], start, end, spaced, text)

    def _string_error(self, start: int) -> RuleSyntaxError:
        """Say precisely what is wrong with the string starting at ``start`` (slow path, errors only)."""
        text = self.text
        i = start + 1
        while i < len(text) and text[i] != '"':
            char = text[i]
            if char in "\r\n":
                return RuleSyntaxError(i + 1, "line break inside a string")
            if char == "\\":
                nxt = text[i + 1 : i + 2]
                if nxt in ('"', "\\"):
                    i += 2
                    continue
                if nxt == "x":
                    if _HEX2.fullmatch(text[i + 2 : i + 4]):
                        i += 4
                        continue
                    return RuleSyntaxError(i + 1, "\\x must be followed by two hex digits")
                shown = "at the end of the rule" if not nxt else repr("\\" + nxt)
                return RuleSyntaxError(
                    i + 1, f'unknown escape {shown} in a string (USBGuard decodes only \\", \\\\ and \\xHH)'
                )
            i += 1
        return RuleSyntaxError(start + 1, 'unterminated string (no closing ")')


def set_item_columns(token: Token) -> list[int]:
    """1-based columns of the items of a SET token (computed only to name an item in an error)."""
    pattern = _WORD if token.words else _STRING
    return [token.start + m.start() + 1 for m in pattern.finditer(token.text, 1, len(token.text) - 1)]
