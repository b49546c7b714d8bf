"""containerd's filter syntax (the `filters` package), for List on snapshots and content.

A filter string is a comma-separated list of selectors that must all match (AND); a list of
filter strings matches when any one of them does (OR); an empty list, or an empty string,
matches everything. A selector is

    <fieldpath>[<operator><value>]

    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_-]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+          (a bare value may contain "." and "/")
    quoted    := "..." | /.../ | |...|      (Go escapes: \\n \\t \\\\ \\xHH \\uHHHH ..., and the quote)

Without an operator the selector tests presence. `==` needs the field present and equal; `!=`
is true for an absent field (its value reads as ""); `~=` searches the value with a regular
expression (unanchored, like Go's `MatchString`; the pattern is compiled at parse time so a bad
pattern is an error rather than a silent non-match). Examples:

    name==foo,labels.bar
    labels."containerd.io/gc.root"
    kind==committed,parent~=/^default\\/3\\//          (the `/` inside /.../ is escaped)

Objects are mappings. A plain field is present when its key is in the mapping and its value is
not None (an empty string is present, as containerd's snapshot adaptor says of `parent`). A
nested mapping (`labels`) takes the rest of the path joined by "." as one key, so
`labels.containerd.io.x` and `labels."containerd.io.x"` name the same label (a `/` in a key
needs the quoted form, since `/` opens a quote); an empty mapping has no fields.

Bad syntax raises `InvalidArgument` with the position marked, as containerd does:
`filters: parse error: [name >|=|< foo]: unsupported operator '='`.

Scanner and unquoting follow containerd 1.6 `filters/scanner.go` and `filters/quote.go`
closely, so that a filter that containerd's client accepts parses the same way here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kernel.errors import InvalidArgument

Filter = Callable[[Mapping[str, Any]], bool]

__all__ = ["Filter", "compile_filters", "parse", "field_value"]


def compile_filters(filters: Sequence[str]) -> Filter:
    """One predicate for a List request: any of `filters` matches (all match for an empty list)."""
    if not filters:
        return _always
    alternatives = [parse(text) for text in filters]
    return lambda obj: any(match(obj) for match in alternatives)


def parse(text: str) -> Filter:
    """Parse one filter string (an AND of selectors); raises InvalidArgument on bad syntax."""
    if text == "":
        return _always
    selectors = _Parser(text).selectors()
    return lambda obj: all(selector.match(obj) for selector in selectors)


def field_value(obj: Mapping[str, Any], fieldpath: Sequence[str]) -> tuple[str, bool]:
    """The string value at `fieldpath` and whether it is present (containerd's Adaptor.Field)."""
    if not fieldpath or fieldpath[0] not in obj:
        return "", False
    value = obj[fieldpath[0]]
    if isinstance(value, Mapping):
        key = ".".join(fieldpath[1:])
        if len(fieldpath) == 1 or key not in value:
            return "", False
        return str(value[key]), True
    if len(fieldpath) > 1 or value is None:
        return "", False
    return str(value), True


def _always(obj: Mapping[str, Any]) -> bool:
    return True


class _Op(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass(frozen=True)
class _Selector:
    fieldpath: tuple[str, ...]
    op: _Op
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, obj: Mapping[str, Any]) -> bool:
        value, present = field_value(obj, self.fieldpath)
        if self.op is _Op.PRESENT:
            return present
        if self.op is _Op.EQUAL:
            return present and value == self.value
        if self.op is _Op.NOT_EQUAL:
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


# --- scanner (containerd filters/scanner.go) ------------------------------------------------

_EOF = ""  # next() at the end of input
_ILLEGAL = "\x00"  # next() on a NUL, which containerd refuses


class _Tok(enum.Enum):
    EOF = "EOF"
    QUOTED = "quoted"
    VALUE = "value"
    FIELD = "field"
    SEPARATOR = "separator"
    OPERATOR = "operator"
    ILLEGAL = "illegal"
    CHAR = "character"  # any other single character


_QUOTES = '/|"'
_SEPARATORS = ",."
_OPERATOR_CHARS = "=!~"
_SIMPLE_ESCAPES = "abfnrtv\\"


def _is_field_char(ch: str) -> bool:
    return ch != _EOF and (ch in "-_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9"))


def _is_value_char(ch: str) -> bool:
    return ch not in (_EOF, _ILLEGAL, ",") and not ch.isspace() and ch.isprintable()


def _digit_value(ch: str) -> int:
    """Go's digitVal: ASCII hex digits only (Python's int() would accept other scripts' digits)."""
    return int(ch, 16) if len(ch) == 1 and ch in "0123456789abcdefABCDEF" else 16


class _Scanner:
    """Tokens of one filter string; `value` is set after an operator so the next bare word is a value."""

    def __init__(self, text: str) -> None:
        self.input = text
        self.pos = 0  # start of the current character
        self.ppos = 0  # just past it
        self.value = False

    def next(self) -> str:
        if self.ppos >= len(self.input):
            self.pos = len(self.input)
            return _EOF
        self.pos = self.ppos
        ch = self.input[self.ppos]
        self.ppos += 1
        return ch

    def peek(self) -> str:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, _Tok, str]:
        ch = self.next()
        while ch != _EOF and ch.isspace():
            ch = self.next()
        pos = self.pos
        if ch == _EOF:
            return pos, _Tok.EOF, ""
        if ch == _ILLEGAL:
            return pos, _Tok.ILLEGAL, ch
        if ch in _QUOTES:
            tok = _Tok.QUOTED if self._scan_quoted(ch) else _Tok.ILLEGAL
            return pos, tok, self.input[pos : self.ppos]
        if ch in _SEPARATORS:
            self.value = False
            return pos, _Tok.SEPARATOR, ch
        if ch in _OPERATOR_CHARS:
            self._scan_while(lambda c: c != _EOF and c in _OPERATOR_CHARS)
            self.value = True
            return pos, _Tok.OPERATOR, self.input[pos : self.ppos]
        if self.value:
            self._scan_while(_is_value_char)
            self.value = False
            return pos, _Tok.VALUE, self.input[pos : self.ppos]
        if _is_field_char(ch):
            self._scan_while(_is_field_char)
            return pos, _Tok.FIELD, self.input[pos : self.ppos]
        return pos, _Tok.CHAR, ch

    def _scan_while(self, accept: Callable[[str], bool]) -> None:
        while accept(self.peek()):
            self.next()

    def _scan_quoted(self, quote: str) -> bool:
        legal = True
        ch = self.next()
        while ch != quote:
            if ch in (_EOF, _ILLEGAL, "\n"):
                return False
            if ch == "\\":
                ch, ok = self._scan_escape(quote)
                legal = legal and ok
            else:
                ch = self.next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        ch = self.next()
        if ch != _EOF and (ch in _SIMPLE_ESCAPES or ch == quote):
            return self.next(), True
        if ch != _EOF and ch in "01234567":
            return self._scan_digits(ch, 8, 3)
        widths = {"x": 2, "u": 4, "U": 8}
        if ch in widths and ch != _EOF:
            return self._scan_digits(self.next(), 16, widths[ch])
        return ch, False

    def _scan_digits(self, ch: str, base: int, count: int) -> tuple[str, bool]:
        while count > 0 and _digit_value(ch) < base:
            ch = self.next()
            count -= 1
        return ch, count == 0


# --- unquoting (containerd filters/quote.go: Go strconv with / and | as extra quotes) ---------


class _QuoteSyntax(ValueError):
    pass


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != text[-1] or text[0] not in _QUOTES:
        raise _QuoteSyntax("quote syntax error")
    quote, body = text[0], text[1:-1]
    if "\n" in body:
        raise _QuoteSyntax("newline in quoted string")
    out = bytearray()
    while body:
        chunk, body = _unquote_char(body, quote)
        out += chunk
    return out.decode("utf-8", errors="surrogateescape")


def _unquote_char(s: str, quote: str) -> tuple[bytes, str]:
    """Decode the first (possibly escaped) character of `s`: its UTF-8 bytes and the rest."""
    c = s[0]
    if c == quote:
        raise _QuoteSyntax(f"unescaped {quote!r} inside quotes")
    if c != "\\":
        return c.encode("utf-8", errors="surrogateescape"), s[1:]
    if len(s) < 2:
        raise _QuoteSyntax("trailing backslash")
    c, s = s[1], s[2:]
    simple = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
    if c in simple:
        return simple[c].encode(), s
    if c in "'\"|/":
        if c != quote:
            raise _QuoteSyntax(f"escaped {c!r} inside {quote}-quotes")
        return c.encode(), s
    if c in "xuU":
        return _unquote_hex(c, s)
    if c in "01234567":
        return _unquote_octal(c, s)
    raise _QuoteSyntax(f"unknown escape sequence \\{c}")


def _unquote_hex(kind: str, s: str) -> tuple[bytes, str]:
    width = {"x": 2, "u": 4, "U": 8}[kind]
    digits = s[:width]
    if len(digits) < width or any(_digit_value(d) >= 16 for d in digits):
        raise _QuoteSyntax(f"bad \\{kind} escape")
    value = int(digits, 16)
    if kind == "x":
        return bytes([value]), s[width:]
    if value > 0x10FFFF:
        raise _QuoteSyntax(f"\\{kind} escape beyond unicode")
    if 0xD800 <= value <= 0xDFFF:
        return "\ufffd".encode(), s[width:]  # Go encodes a surrogate as U+FFFD
    return chr(value).encode(), s[width:]


def _unquote_octal(first: str, s: str) -> tuple[bytes, str]:
    digits = first + s[:2]
    if len(digits) < 3 or any(d not in "01234567" for d in digits):
        raise _QuoteSyntax("bad octal escape")
    value = int(digits, 8)
    if value > 255:
        raise _QuoteSyntax("octal escape above \\377")
    return bytes([value]), s[2:]


# --- parser (containerd filters/parser.go) -----------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.input = text
        self.scanner = _Scanner(text)

    def selectors(self) -> list[_Selector]:
        selectors = [self.selector()]
        while True:
            ch = self.scanner.peek()
            if ch == _EOF:
                return selectors
            if ch != ",":
                raise self.error(self.scanner.ppos, f"unexpected input: {ch}")
            self.scanner.scan()
            selectors.append(self.selector())

    def selector(self) -> _Selector:
        fieldpath = self.fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return _Selector(fieldpath, _Op.PRESENT)
        op = self.operator()
        value = self.value()
        regex = self.compile_regex(value) if op is _Op.MATCHES else None
        return _Selector(fieldpath, op, value, regex)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text)
        raise self.error(pos, f"expected field or quoted, got {tok.value}")

    def operator(self) -> _Op:
        pos, tok, text = self.scanner.scan()
        if tok is not _Tok.OPERATOR:
            raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')
        for op in (_Op.EQUAL, _Op.NOT_EQUAL, _Op.MATCHES):
            if text == op.value:
                return op
        raise self.error(pos, f"unsupported operator {text!r}")

    def value(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok in (_Tok.VALUE, _Tok.FIELD):
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text)
        raise self.error(pos, f"expected value or quoted, got {tok.value}")

    def unquote(self, pos: int, text: str) -> str:
        try:
            return _unquote(text)
        except _QuoteSyntax as exc:
            raise self.error(pos, f"unquoting failed: {exc}") from None

    def compile_regex(self, pattern: str) -> re.Pattern[str]:
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise InvalidArgument(f"filter {self.input!r}: compile regexp {pattern!r}: {exc}") from None

    def error(self, pos: int, message: str) -> InvalidArgument:
        """containerd's parseError: the input with the offending character marked."""
        text = self.input
        if pos < len(text):
            where = f"[{text[:pos]} >|{text[pos]}|< {text[pos + 1 :]}]"
        else:
            where = f"[{text}]"
        return InvalidArgument(f"filters: parse error: {where}: {message}")
