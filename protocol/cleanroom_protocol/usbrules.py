"""USBGuard rules (usbguard-rules.conf(5)): parse and match as USBGuard does. Pure: no sysfs, no I/O.

Grammar (USBGuard's ``Grammar.hpp``; tokens in :mod:`usbrulelex`)::

    rule      ::= target [device-id] attribute* [# comment]
    target    ::= allow | block | reject
    attribute ::= name value | name [operator] { value … }
    operator  ::= all-of | one-of | none-of | equals | equals-ordered | match-all   (default equals)

Attributes: ``id`` (``vvvv:pppp``, ``*`` for the product or both; a bare id may follow the target),
``serial``, ``name``, ``hash``, ``parent-hash``, ``via-port``, ``with-connect-type`` and ``label``
(double-quoted strings), ``with-interface`` (``cc:ss:pp``, ``cc:ss:*`` or ``cc:*:*``). Each at most once.

Matching (USBGuard's ``Rule::Attribute::appliesTo``): an attribute the rule does not name matches every
device. The device side of ``with-interface`` is the list of every interface descriptor of every
configuration and alternate setting, duplicates kept; every other attribute is one value. With rule
values R and device values D:

* ``all-of``: every r in R matches some d; ``one-of``: some r matches some d; ``none-of``: no r matches
  any d; ``equals``: |R| = |D| and every r matches some d (a count check, not a set comparison);
  ``equals-ordered``: |R| = |D| and r_i matches d_i; ``match-all``: every d is matched by some r.
* So a set compared with a single-valued attribute: ``serial { "a" "b" }`` (equals) never matches,
  ``serial one-of { "a" "b" }`` matches either.
* "matches" is byte equality for strings, wildcard match for ids and interface types, and ids compare as
  text, as USBGuard compares them (sysfs writes them in lowercase).

Refused, with the rule and column named:

* everything USBGuard's parser refuses;
* as *unsupported*: conditions (``if …``), the ``match``/``device`` targets, and two operator uses
  where USBGuard's code contradicts its manual: ``match-all`` on a string attribute (USBGuard matches
  every device: its string superset test is unimplemented and answers true) and ``id match-all`` with a
  ``*`` (compared the other way round, it never matches);
* rules that would fail open silently: a ``block``/``reject`` rule that no device can match
  (``block serial { "a" "b" }``, ``all-of`` with different values of a single-valued attribute) or a value
  no device can have in a positive set of a ``block``/``reject`` rule or in the ``none-of`` set of an
  ``allow`` rule (an upper-case id, a hash that is not a base64 SHA-256, a port name or connect type the
  kernel never writes). USBGuard accepts those and they silently match nothing; an ``allow`` rule that
  matches nothing fails closed and is accepted as USBGuard accepts it.

First matching rule wins; no match means ``block`` (USBGuard's implicit target). Blank and comment-only
entries are skipped, as USBGuard skips such lines.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property, lru_cache
from operator import attrgetter
from typing import TypeVar

from .usbrulelex import Lexer, RuleSyntaxError, Token, TokenKind, quote, set_item_columns

_T = TypeVar("_T")


class Target(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    REJECT = "reject"


class SetOperator(StrEnum):
    ALL_OF = "all-of"
    ONE_OF = "one-of"
    NONE_OF = "none-of"
    EQUALS = "equals"
    EQUALS_ORDERED = "equals-ordered"
    MATCH_ALL = "match-all"


class UsbRuleError(ValueError):
    """A rule USBGuard refuses, or one this agent refuses (unsupported or failing open). The message
    names the rule (1-based position in the policy's list), the column and the construct."""

    def __init__(self, message: str, *, rule: int, column: int, text: str, unsupported: bool = False) -> None:
        self.message = message
        self.rule = rule
        self.column = column
        self.text = text
        self.unsupported = unsupported
        super().__init__(f"usb rule {rule}, column {column}: {message}: {text.strip()[:200]!r}")


class _Unsupported(RuleSyntaxError):
    def __init__(self, column: int, construct: str) -> None:
        super().__init__(column, f"unsupported: {construct}")


# values ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Interface:
    """One interface descriptor of a device (class, subclass, protocol)."""

    cls: int
    subclass: int
    protocol: int

    def __str__(self) -> str:
        return f"{self.cls:02x}:{self.subclass:02x}:{self.protocol:02x}"


@dataclass(frozen=True, slots=True)
class InterfaceType:
    """A rule's interface type: ``cc:ss:pp``, ``cc:ss:*`` or ``cc:*:*`` (None = ``*``)."""

    cls: int
    subclass: int | None
    protocol: int | None

    def applies_to(self, iface: Interface) -> bool:
        return (
            self.cls == iface.cls
            and (self.subclass is None or self.subclass == iface.subclass)
            and (self.protocol is None or self.protocol == iface.protocol)
        )

    def __str__(self) -> str:
        sub = "*" if self.subclass is None else f"{self.subclass:02x}"
        proto = "*" if self.protocol is None else f"{self.protocol:02x}"
        return f"{self.cls:02x}:{sub}:{proto}"


@dataclass(frozen=True, slots=True)
class DeviceId:
    """A rule's ``vendor:product``, as text (``*`` is a wildcard), compared as USBGuard compares it."""

    vendor: str
    product: str

    def covers(self, vendor: str, product: str) -> bool:
        """USBGuard's ``USBDeviceID::isSubsetOf``: this pattern contains the device id."""
        if self.vendor == "*":
            return True
        if self.vendor != vendor:
            return False
        return self.product in ("*", product)

    def __str__(self) -> str:
        return f"{self.vendor}:{self.product}"


@dataclass(frozen=True)
class UsbDevice:
    """What a rule can look at, as USBGuard reads it from sysfs (strings are raw bytes).

    ``interfaces``: every interface descriptor of every configuration, in descriptor order, duplicates
    kept. ``hash``/``parent_hash``: USBGuard's base64 SHA-256 values (see :mod:`usbdescriptors`).
    ``port``: the sysfs name (``1-2.1``, ``usb1``); ``connect_type``: the port's ``connect_type``."""

    vendor_id: str
    product_id: str
    serial: bytes = b""
    name: bytes = b""
    interfaces: tuple[Interface, ...] = ()
    hash: bytes = b""
    parent_hash: bytes = b""
    port: bytes = b""
    connect_type: bytes = b""

    @property
    def id(self) -> str:
        return f"{self.vendor_id}:{self.product_id}"


# attribute sets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StringSet:
    """A string attribute against the device's single value."""

    operator: SetOperator
    values: tuple[bytes, ...]

    @cached_property
    def members(self) -> frozenset[bytes]:
        return frozenset(self.values)

    def holds(self, value: bytes) -> bool:
        op = self.operator
        if op is SetOperator.ONE_OF:
            return value in self.members
        if op is SetOperator.NONE_OF:
            return value not in self.members
        if op is SetOperator.ALL_OF:
            return self.members == {value}
        if op is SetOperator.MATCH_ALL:  # refused at parse time (see the module docstring)
            return value in self.members
        return len(self.values) == 1 and self.values[0] == value  # equals, equals-ordered


@dataclass(frozen=True, slots=True)
class IdSet:
    """``id`` against the device's single ``vendor:product``."""

    operator: SetOperator
    values: tuple[DeviceId, ...]

    def holds(self, vendor: str, product: str) -> bool:
        op = self.operator
        if op is SetOperator.ONE_OF:
            return any(v.covers(vendor, product) for v in self.values)
        if op is SetOperator.NONE_OF:
            return not any(v.covers(vendor, product) for v in self.values)
        if op is SetOperator.ALL_OF:
            return all(v.covers(vendor, product) for v in self.values)
        if op is SetOperator.MATCH_ALL:
            # USBGuard asks whether the device id, as a pattern, contains the rule's value: exact ids only
            # (wildcards are refused at parse time).
            return any(v.vendor == vendor and v.product == product for v in self.values)
        return len(self.values) == 1 and self.values[0].covers(vendor, product)


@dataclass(frozen=True, slots=True)
class InterfaceSet:
    """``with-interface`` against the device's interface list (a multiset)."""

    operator: SetOperator
    values: tuple[InterfaceType, ...]

    def holds(self, interfaces: tuple[Interface, ...]) -> bool:
        rule = self.values
        op = self.operator
        if op is SetOperator.ONE_OF:
            return any(r.applies_to(d) for r in rule for d in interfaces)
        if op is SetOperator.NONE_OF:
            return not any(r.applies_to(d) for r in rule for d in interfaces)
        if op is SetOperator.ALL_OF:
            return all(any(r.applies_to(d) for d in interfaces) for r in rule)
        if op is SetOperator.MATCH_ALL:
            return all(any(r.applies_to(d) for r in rule) for d in interfaces)
        if len(rule) != len(interfaces):
            return False
        if op is SetOperator.EQUALS_ORDERED:
            return all(r.applies_to(d) for r, d in zip(rule, interfaces, strict=True))
        return all(any(r.applies_to(d) for d in interfaces) for r in rule)

    def names(self, iface: Interface) -> bool:
        """The rule vouches for this interface: a positive set with a type that applies to it."""
        return self.operator is not SetOperator.NONE_OF and any(r.applies_to(iface) for r in self.values)


@dataclass(frozen=True)
class UsbRule:
    target: Target
    text: str
    id: IdSet | None = None
    serial: StringSet | None = None
    name: StringSet | None = None
    hash: StringSet | None = None
    parent_hash: StringSet | None = None
    via_port: StringSet | None = None
    with_interface: InterfaceSet | None = None
    with_connect_type: StringSet | None = None
    label: tuple[bytes, ...] = ()  # annotation only: USBGuard never matches on it

    def matches(self, device: UsbDevice) -> bool:
        return (
            (self.id is None or self.id.holds(device.vendor_id, device.product_id))
            and (self.serial is None or self.serial.holds(device.serial))
            and (self.name is None or self.name.holds(device.name))
            and (self.hash is None or self.hash.holds(device.hash))
            and (self.parent_hash is None or self.parent_hash.holds(device.parent_hash))
            and (self.via_port is None or self.via_port.holds(device.port))
            and (self.with_connect_type is None or self.with_connect_type.holds(device.connect_type))
            and (self.with_interface is None or self.with_interface.holds(device.interfaces))
        )


# parsing --------------------------------------------------------------------------------------------
_TARGETS = {t.value: t for t in Target}
_OPERATORS = {o.value: o for o in SetOperator}
_STRING_ATTRIBUTES = {
    "name": "name",
    "serial": "serial",
    "hash": "hash",
    "parent-hash": "parent_hash",
    "via-port": "via_port",
    "with-connect-type": "with_connect_type",
    "label": "label",
}
_KEYWORDS = {"id", "with-interface", "if", *_STRING_ATTRIBUTES}
_ID_SHAPE = re.compile(r"^([0-9A-Fa-f]{4}|\*):([0-9A-Fa-f]{4}|\*)$")
_IFACE_SHAPE = re.compile(r"^([^:]*):([^:]*):([^:]*)$")
_HEX2 = re.compile(r"^[0-9A-Fa-f]{2}$")
_PORT = re.compile(rb"usb[0-9]+|[0-9]+-[0-9]+(?:\.[0-9]+)*")
_CONNECT_TYPES = frozenset({b"hotplug", b"hardwired", b"not used", b"unknown", b""})
_POSITIVE = (
    SetOperator.ALL_OF,
    SetOperator.ONE_OF,
    SetOperator.EQUALS,
    SetOperator.EQUALS_ORDERED,
    SetOperator.MATCH_ALL,
)


class _BadValue(ValueError):
    pass


@lru_cache(maxsize=4096)
def _device_id(word: str) -> DeviceId:
    """A ``vvvv:pppp`` word (:class:`_BadValue` says why not)."""
    match = _ID_SHAPE.match(word)
    if match is None:
        raise _BadValue(f"bad device id {word!r}: want vvvv:pppp (4 hex digits each, or *)")
    vendor, product = match.groups()
    if vendor == "*" and product != "*":
        raise _BadValue(f"bad device id {word!r}: with * as the vendor the product must be * too")
    return DeviceId(vendor, product)


@lru_cache(maxsize=4096)
def _interface_type(word: str) -> InterfaceType:
    """A ``cc:ss:pp`` word (USBGuard's ``USBInterfaceType`` rules; :class:`_BadValue` says why not)."""
    shape = "USBGuard accepts cc:ss:pp, cc:ss:* and cc:*:* (hex)"
    match = _IFACE_SHAPE.match(word)
    if match is None:
        raise _BadValue(f"bad interface type {word!r}: {shape}")
    cls, sub, proto = match.groups()
    if not _HEX2.match(cls):
        raise _BadValue(f"bad interface type {word!r}: the class must be two hex digits; {shape}")
    for part in (sub, proto):
        if part != "*" and not _HEX2.match(part):
            raise _BadValue(f"bad interface type {word!r}: {shape}")
    if sub == "*" and proto != "*":
        raise _BadValue(f"bad interface type {word!r}: with * as the subclass the protocol must be * too")
    return InterfaceType(
        int(cls, 16), None if sub == "*" else int(sub, 16), None if proto == "*" else int(proto, 16)
    )


def _convert(convert: Callable[[str], _T], values: _Values) -> tuple[_T, ...]:
    """All words converted at C speed; on a bad one, find it and name its column."""
    try:
        return tuple(map(convert, values.words))
    except _BadValue:
        for n, word in enumerate(values.words):
            try:
                convert(word)
            except _BadValue as exc:
                raise RuleSyntaxError(values.columns()[n], str(exc)) from None
        raise


@dataclass
class _Values:
    """One attribute's operator and raw values as written, with their columns (computed on demand)."""

    operator: SetOperator
    column: int  # where the value part starts (operator, set or single value)
    words: tuple[str, ...] = ()
    strings: tuple[bytes, ...] = ()
    columns: Callable[[], list[int]] = lambda: []


def _describe(token: Token) -> str:
    if token.kind is TokenKind.WORD:
        return repr(token.text)
    if token.kind is TokenKind.STRING:
        return "a quoted string"
    if token.kind is TokenKind.SET:
        return "a { … } set"
    return repr(token.kind.value) if token.kind is not TokenKind.END else "the end of the rule"


class _Parser:
    def __init__(self, text: str) -> None:
        self.lexer = Lexer(text)
        self.tok = self.lexer.next()

    def advance(self) -> None:
        self.tok = self.lexer.next()

    def parse(self) -> UsbRule | None:
        tok = self.tok
        if tok.kind is TokenKind.END:
            return None  # blank or comment only
        if tok.kind is not TokenKind.WORD:
            raise RuleSyntaxError(tok.column, "a rule starts with allow, block or reject")
        if tok.text in ("match", "device"):
            raise _Unsupported(
                tok.column, f"target {tok.text!r} (USBGuard uses it for queries and device listings)"
            )
        target = _TARGETS.get(tok.text)
        if target is None:
            raise RuleSyntaxError(tok.column, f"unknown target {tok.text!r}: want allow, block or reject")
        self.advance()
        attrs: dict[str, object] = {}
        tok = self.tok
        if (
            tok.kind is TokenKind.WORD
            and tok.spaced
            and tok.text not in _KEYWORDS
            and tok.text not in _OPERATORS
            and ":" in tok.text
        ):
            attrs["id"] = IdSet(SetOperator.EQUALS, (self._id_value(tok.text, tok.column),))
            self.advance()
        while (tok := self.tok).kind is not TokenKind.END:
            if not tok.spaced:
                raise RuleSyntaxError(tok.column, f"missing blank before {_describe(tok)}")
            if tok.kind is not TokenKind.WORD:
                raise RuleSyntaxError(tok.column, f"expected an attribute name, not {_describe(tok)}")
            keyword = tok.text
            if keyword == "if":
                raise _Unsupported(tok.column, "conditions (if …)")
            if keyword not in _KEYWORDS:
                if _ID_SHAPE.match(keyword):
                    raise RuleSyntaxError(
                        tok.column,
                        f"a bare device id must follow the target directly (or write id {keyword})",
                    )
                raise RuleSyntaxError(tok.column, f"unknown attribute {keyword!r}")
            if keyword in attrs:
                # USBGuard means to refuse every repeated attribute; for label its check is attached to
                # the wrong keyword and repeats are let through. Refused here like the others.
                raise RuleSyntaxError(tok.column, f"{keyword} attribute already defined")
            self.advance()
            values = self._values(keyword)
            if keyword == "label":
                attrs[keyword] = values.strings
            else:
                attrs[keyword] = self._attribute(target, keyword, values)
        return UsbRule(
            target=target,
            text=self.lexer.text,
            id=_typed(attrs.get("id"), IdSet),
            serial=_typed(attrs.get("serial"), StringSet),
            name=_typed(attrs.get("name"), StringSet),
            hash=_typed(attrs.get("hash"), StringSet),
            parent_hash=_typed(attrs.get("parent-hash"), StringSet),
            via_port=_typed(attrs.get("via-port"), StringSet),
            with_interface=_typed(attrs.get("with-interface"), InterfaceSet),
            with_connect_type=_typed(attrs.get("with-connect-type"), StringSet),
            label=_typed(attrs.get("label"), tuple) or (),
        )

    # values --------------------------------------------------------------------------------------------
    def _values(self, keyword: str) -> _Values:
        tok = self.tok
        if tok.kind is TokenKind.END:
            raise RuleSyntaxError(tok.column, f"{keyword} needs a value")
        if not tok.spaced:
            raise RuleSyntaxError(tok.column, f"missing blank between {keyword} and its value")
        start = tok.column
        operator = SetOperator.EQUALS
        if tok.kind is TokenKind.WORD and tok.text in _OPERATORS:
            operator = _OPERATORS[tok.text]
            self.advance()
            tok = self.tok
            if tok.kind not in (TokenKind.SET, TokenKind.LBRACE):
                raise RuleSyntaxError(tok.column, f"{operator} needs a {{ … }} set after it")
            if not tok.spaced:
                raise RuleSyntaxError(tok.column, f"missing blank between {operator} and {{")
        wants_strings = keyword in _STRING_ATTRIBUTES
        if tok.kind is TokenKind.SET:
            self.advance()
            if wants_strings != bool(tok.strings):
                self._wrong_kind(keyword, set_item_columns(tok)[0], tok.words[0] if tok.words else None)
            set_token = tok
            return _Values(
                operator,
                start,
                tok.words,
                tok.strings,
                lambda: set_item_columns(set_token),
            )
        if tok.kind is TokenKind.LBRACE:
            return self._set_slowly(keyword, operator, start)
        if tok.kind is TokenKind.RBRACE:
            raise RuleSyntaxError(tok.column, "} without {")
        self._check_kind(keyword, tok)
        self.advance()
        if wants_strings:
            return _Values(operator, start, strings=(tok.value,), columns=lambda: [tok.column])
        return _Values(operator, start, words=(tok.text,), columns=lambda: [tok.column])

    def _set_slowly(self, keyword: str, operator: SetOperator, start: int) -> _Values:
        """``{ … }`` token by token: a set the one-expression fast path did not take, so most likely a
        malformed one; this names the first problem."""
        opening = self.tok
        self.advance()
        words: list[str] = []
        strings: list[bytes] = []
        columns: list[int] = []
        while (tok := self.tok).kind is not TokenKind.RBRACE:
            if tok.kind is TokenKind.END:
                raise RuleSyntaxError(opening.column, "unclosed { (no matching })")
            if tok.kind in (TokenKind.LBRACE, TokenKind.SET):
                raise RuleSyntaxError(tok.column, "sets do not nest")
            if columns and not tok.spaced:
                raise RuleSyntaxError(tok.column, "missing blank between two set values")
            self._check_kind(keyword, tok)
            if tok.kind is TokenKind.STRING:
                strings.append(tok.value)
            else:
                words.append(tok.text)
            columns.append(tok.column)
            self.advance()
        if not columns:
            raise RuleSyntaxError(opening.column, "empty set")
        self.advance()
        return _Values(operator, start, tuple(words), tuple(strings), lambda: columns)

    def _check_kind(self, keyword: str, tok: Token) -> None:
        if keyword in _STRING_ATTRIBUTES:
            if tok.kind is not TokenKind.STRING:
                self._wrong_kind(keyword, tok.column, tok.text)
        elif tok.kind is not TokenKind.WORD:
            self._wrong_kind(keyword, tok.column, None)

    @staticmethod
    def _wrong_kind(keyword: str, column: int, word: str | None) -> None:
        if keyword in _STRING_ATTRIBUTES:
            if word is not None and word.startswith("'"):
                raise RuleSyntaxError(
                    column, f"{keyword} takes a double-quoted string (single quotes are not)"
                )
            raise RuleSyntaxError(column, f"{keyword} takes a double-quoted string, not {word!r}")
        form = "vvvv:pppp" if keyword == "id" else "cc:ss:pp"
        raise RuleSyntaxError(column, f"{keyword} takes {form} unquoted, not a string")

    # attributes ----------------------------------------------------------------------------------------
    def _id_value(self, word: str, column: int) -> DeviceId:
        try:
            return _device_id(word)
        except _BadValue as exc:
            raise RuleSyntaxError(column, str(exc)) from None

    def _attribute(self, target: Target, keyword: str, values: _Values) -> object:
        op = values.operator
        if keyword == "with-interface":
            return InterfaceSet(op, _convert(_interface_type, values))
        if keyword == "id":
            id_set = IdSet(op, _convert(_device_id, values))
            self._check_ids(target, id_set, values)
            return id_set
        string_set = StringSet(op, values.strings)
        self._check_strings(target, keyword, string_set, values)
        return string_set

    # The checks below run over every value of sets that may hold thousands: C-level passes first,
    # Python loops only to name the offending value.
    def _check_ids(self, target: Target, ids: IdSet, values: _Values) -> None:
        op = ids.operator
        joined = " ".join(values.words)
        if op is SetOperator.MATCH_ALL and "*" in joined:
            raise _Unsupported(
                values.column,
                "id match-all with a * wildcard (USBGuard compares it the other way round and it never "
                "matches; list exact ids or use one-of)",
            )
        if _fails_open(target, op) and joined != joined.lower():
            n = next(i for i, word in enumerate(values.words) if word != word.lower())
            raise RuleSyntaxError(
                values.columns()[n],
                f"device id {values.words[n]} never matches: sysfs writes ids in lower case and USBGuard "
                f"compares them as text (this {target} rule would fail open)",
            )
        if target is not Target.ALLOW and len(ids.values) > 1:
            if op in (SetOperator.EQUALS, SetOperator.EQUALS_ORDERED):
                raise self._never(values, "id", op)
            if op is SetOperator.ALL_OF:
                vendors = set(map(_vendor, ids.values)) - {"*"}
                products = set(map(_product, ids.values)) - {"*"}
                if len(vendors) > 1 or len(products) > 1:
                    raise self._never(values, "id", op)

    def _check_strings(self, target: Target, keyword: str, values_set: StringSet, values: _Values) -> None:
        op = values_set.operator
        if op is SetOperator.MATCH_ALL:
            raise _Unsupported(
                values.column,
                f"{keyword} match-all (on a string attribute USBGuard's match-all matches every device; "
                "use one-of)",
            )
        if (
            target is not Target.ALLOW
            and len(values_set.values) > 1
            and (
                op in (SetOperator.EQUALS, SetOperator.EQUALS_ORDERED)
                or (op is SetOperator.ALL_OF and len(values_set.members) > 1)
            )
        ):
            raise self._never(values, keyword, op)
        possible = _POSSIBLE.get(keyword)
        if possible is None or not _fails_open(target, op) or all(map(possible[0], values_set.values)):
            return
        n = next(i for i, value in enumerate(values_set.values) if not possible[0](value))
        raise RuleSyntaxError(
            values.columns()[n],
            f"{keyword} {quote(values_set.values[n])} never matches: {possible[1]} "
            f"(this {target} rule would fail open)",
        )

    @staticmethod
    def _never(values: _Values, keyword: str, op: SetOperator) -> RuleSyntaxError:
        return RuleSyntaxError(
            values.column,
            f"{keyword} {op} with several values never matches: a device has one {keyword} "
            "(a block/reject rule that never matches fails open; use one-of)",
        )


def _fails_open(target: Target, op: SetOperator) -> bool:
    """Would a value that no device has make this rule match fewer devices than it should block, or more
    than it should allow?"""
    if target is Target.ALLOW:
        return op is SetOperator.NONE_OF
    return op in _POSITIVE


_HASH = re.compile(rb"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")  # base64 of exactly 32 bytes
_POSSIBLE: dict[str, tuple[Callable[[bytes], object], str]] = {
    "hash": (_HASH.fullmatch, "USBGuard hashes are base64 SHA-256 digests (44 characters)"),
    "parent-hash": (_HASH.fullmatch, "USBGuard hashes are base64 SHA-256 digests (44 characters)"),
    "via-port": (_PORT.fullmatch, "kernel port names are usbN or bus-port[.port…]"),
    "with-connect-type": (
        _CONNECT_TYPES.__contains__,
        'the kernel writes "hotplug", "hardwired", "not used" or "unknown" (or nothing)',
    ),
}
_vendor = attrgetter("vendor")
_product = attrgetter("product")


def _typed(value: object, kind: type[_T]) -> _T | None:
    return value if isinstance(value, kind) else None


def parse_line(text: str, *, index: int = 0) -> UsbRule | None:
    """One policy entry: a rule, or None for a blank or comment-only entry."""
    try:
        return _Parser(text).parse()
    except RuleSyntaxError as exc:
        raise UsbRuleError(
            exc.message,
            rule=index + 1,
            column=exc.column,
            text=text,
            unsupported=isinstance(exc, _Unsupported),
        ) from None


def parse_rule(text: str, *, index: int = 0) -> UsbRule:
    rule = parse_line(text, index=index)
    if rule is None:
        raise UsbRuleError("empty rule", rule=index + 1, column=1, text=text)
    return rule


def parse_rules(texts: Sequence[str]) -> list[UsbRule]:
    """A policy's ``[usb] rules``, in order; the first refused entry raises :class:`UsbRuleError`."""
    rules = []
    for n, text in enumerate(texts):
        rule = parse_line(text, index=n)
        if rule is not None:
            rules.append(rule)
    return rules


# judging --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UsbVerdict:
    target: Target
    rule: str  # the matching rule's text, or "implicit block"
    reason: str
    forbidden_interfaces: tuple[str, ...] = field(default=())


def first_match(rules: Sequence[UsbRule], device: UsbDevice) -> tuple[Target, UsbRule | None]:
    for rule in rules:
        if rule.matches(device):
            return rule.target, rule
    return Target.BLOCK, None


def judge_device(rules: Sequence[UsbRule], device: UsbDevice) -> UsbVerdict:
    """First match wins (USBGuard); then this agent's BadUSB check, which USBGuard does not make: when an
    ``allow`` rule matched a device with several interfaces, every interface the matching rule does not
    name in a positive ``with-interface`` set is judged alone (same id, serial, name, hash, port), and if
    one of them alone would not be allowed the whole device is rejected. A "keyboard" that also brings
    mass storage is refused whole, not half-authorized; a device allowed by a rule listing its exact
    interfaces (``usb devices --rules``) passes."""
    target, rule = first_match(rules, device)
    text = rule.text.strip() if rule is not None else "implicit block"
    if target is not Target.ALLOW or rule is None:
        return UsbVerdict(target, text, f"matched {text!r}")
    if len(device.interfaces) > 1:
        named = rule.with_interface
        forbidden: list[str] = []
        for iface in device.interfaces:
            if named is not None and named.names(iface):
                continue
            alone = dataclasses.replace(device, interfaces=(iface,))
            if first_match(rules, alone)[0] is not Target.ALLOW and str(iface) not in forbidden:
                forbidden.append(str(iface))
        if forbidden:
            return UsbVerdict(
                Target.REJECT,
                text,
                f"composite device with forbidden interface(s) {', '.join(forbidden)}",
                tuple(forbidden),
            )
    return UsbVerdict(Target.ALLOW, text, f"matched {text!r}")


def is_hid_only(device: UsbDevice) -> bool:
    """Every interface is HID (class 03): keyboards, mice, and nothing else."""
    return bool(device.interfaces) and all(i.cls == 0x03 for i in device.interfaces)


# writing rules ----------------------------------------------------------------------------------------
def device_rule(
    device: UsbDevice,
    *,
    target: Target = Target.ALLOW,
    with_port: bool = False,
    with_hash: bool = True,
) -> str:
    """The device as a USBGuard rule line, as ``usbguard generate-policy`` writes it (attribute order of
    USBGuard's ``Rule::toString``; strings escaped with ``\\xHH`` for every non-printable byte; an empty
    interface list omitted, a single interface written bare)."""
    parts = [target.value, f"id {device.id}", f"serial {quote(device.serial)}", f"name {quote(device.name)}"]
    if with_hash:
        parts += [f"hash {quote(device.hash)}", f"parent-hash {quote(device.parent_hash)}"]
    if with_port:
        parts.append(f"via-port {quote(device.port)}")
    if len(device.interfaces) == 1:
        parts.append(f"with-interface {device.interfaces[0]}")
    elif device.interfaces:
        parts.append("with-interface { " + " ".join(str(i) for i in device.interfaces) + " }")
    parts.append(f"with-connect-type {quote(device.connect_type)}")
    return " ".join(parts)
