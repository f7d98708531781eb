"""USBGuard rule subset: parse and match. Pure: no sysfs, no I/O.

Supported (the part that matters for thin clients)::

    allow|block|reject [id VVVV:PPPP] [serial S] [name S] [with-interface SPEC]

* ``id``: hex vendor/product with ``*`` wildcards (``046d:*``, ``*:*``).
* ``serial`` / ``name``: a quoted string, or ``one-of { "a" "b" }`` / ``none-of { … }``.
* ``with-interface``: ``cc:ss:pp`` (hex, each part may be ``*``), alone (operator ``equals``) or
  ``[equals|one-of|all-of|none-of|match-all] { cc:ss:pp … }``.

First matching rule wins; no match means ``block`` (USBGuard's implicit target). Anything else in a rule
(``via-port``, ``hash``, ``if``…) is a :class:`UsbRuleError` naming the rule and the token, so a policy
never silently means less than it says.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from enum import StrEnum


class Target(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    REJECT = "reject"


class UsbRuleError(ValueError):
    """A rule outside the supported subset or malformed; the message names rule and token."""


@dataclass(frozen=True)
class Interface:
    cls: int
    subclass: int
    protocol: int

    def __str__(self) -> str:
        return f"{self.cls:02x}:{self.subclass:02x}:{self.protocol:02x}"


@dataclass(frozen=True)
class UsbDevice:
    """What a rule can look at. ``interfaces`` are all interfaces of all configurations."""

    vendor: int
    product: int
    serial: str = ""
    name: str = ""
    interfaces: tuple[Interface, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.vendor:04x}:{self.product:04x}"


@dataclass(frozen=True)
class InterfacePattern:
    cls: int | None  # None = wildcard
    subclass: int | None
    protocol: int | None

    def matches(self, iface: Interface) -> bool:
        return (
            (self.cls is None or self.cls == iface.cls)
            and (self.subclass is None or self.subclass == iface.subclass)
            and (self.protocol is None or self.protocol == iface.protocol)
        )


_SET_OPERATORS = ("equals", "one-of", "all-of", "none-of", "match-all")


@dataclass(frozen=True)
class InterfaceCondition:
    operator: str
    patterns: tuple[InterfacePattern, ...]

    def holds(self, interfaces: tuple[Interface, ...]) -> bool:
        pats = self.patterns
        if self.operator == "one-of":
            return any(p.matches(i) for p in pats for i in interfaces)
        if self.operator == "none-of":
            return not any(p.matches(i) for p in pats for i in interfaces)
        if self.operator == "all-of":
            return all(any(p.matches(i) for i in interfaces) for p in pats)
        if self.operator == "match-all":
            return bool(interfaces) and all(any(p.matches(i) for p in pats) for i in interfaces)
        # equals: every device interface is covered by the rule and every rule item is present.
        return (
            bool(interfaces)
            and all(any(p.matches(i) for p in pats) for i in interfaces)
            and all(any(p.matches(i) for i in interfaces) for p in pats)
        )


@dataclass(frozen=True)
class StringCondition:
    operator: str  # "equals" | "one-of" | "none-of"
    values: tuple[str, ...]

    def holds(self, value: str) -> bool:
        if self.operator == "none-of":
            return value not in self.values
        return value in self.values


@dataclass(frozen=True)
class UsbRule:
    target: Target
    text: str
    vendor: int | None = None
    product: int | None = None
    id_given: bool = False
    serial: StringCondition | None = None
    name: StringCondition | None = None
    interfaces: InterfaceCondition | None = None

    def matches(self, device: UsbDevice) -> bool:
        if self.vendor is not None and self.vendor != device.vendor:
            return False
        if self.product is not None and self.product != device.product:
            return False
        if self.serial is not None and not self.serial.holds(device.serial):
            return False
        if self.name is not None and not self.name.holds(device.name):
            return False
        return self.interfaces is None or self.interfaces.holds(device.interfaces)


_HEX4 = re.compile(r"^(?:[0-9a-fA-F]{4}|\*)$")
_HEX2 = re.compile(r"^(?:[0-9a-fA-F]{2}|\*)$")


def _hex_or_wild(part: str) -> int | None:
    return None if part == "*" else int(part, 16)


def _interface_pattern(token: str, where: str) -> InterfacePattern:
    parts = token.split(":")
    if len(parts) != 3 or not all(_HEX2.match(p) for p in parts):
        raise UsbRuleError(f"{where}: bad interface {token!r} (want cc:ss:pp, hex or *)")
    return InterfacePattern(*(_hex_or_wild(p) for p in parts))


def _take_set(tokens: list[str], i: int, where: str) -> tuple[str, list[str], int]:
    """At tokens[i]: ``[op] { a b }`` or a single value. Returns (operator, values, next index)."""
    operator = "equals"
    if i < len(tokens) and tokens[i] in _SET_OPERATORS:
        operator = tokens[i]
        i += 1
    if i >= len(tokens):
        raise UsbRuleError(f"{where}: value missing at end of rule")
    if tokens[i] != "{":
        if operator != "equals":
            raise UsbRuleError(f"{where}: {operator} needs a {{ … }} set")
        return operator, [tokens[i]], i + 1
    try:
        end = tokens.index("}", i)
    except ValueError:
        raise UsbRuleError(f"{where}: unclosed {{") from None
    values = tokens[i + 1 : end]
    if not values:
        raise UsbRuleError(f"{where}: empty set")
    return operator, values, end + 1


def parse_rule(text: str, *, index: int = 0) -> UsbRule:
    where = f"usb rule {index + 1} ({text.strip()!r})"
    try:
        tokens = shlex.split(text.replace("{", " { ").replace("}", " } "), comments=True)
    except ValueError as exc:
        raise UsbRuleError(f"{where}: {exc}") from None
    if not tokens:
        raise UsbRuleError(f"{where}: empty rule")
    try:
        target = Target(tokens[0])
    except ValueError:
        raise UsbRuleError(f"{where}: target must be allow, block or reject, not {tokens[0]!r}") from None
    fields: dict[str, object] = {}
    i = 1
    while i < len(tokens):
        key = tokens[i]
        if key in fields:
            raise UsbRuleError(f"{where}: {key} given twice")
        i += 1
        if key == "id":
            if i >= len(tokens):
                raise UsbRuleError(f"{where}: id needs vvvv:pppp")
            parts = tokens[i].split(":")
            if len(parts) != 2 or not all(_HEX4.match(p) for p in parts):
                raise UsbRuleError(f"{where}: bad id {tokens[i]!r} (want vvvv:pppp, hex or *)")
            fields["vendor"], fields["product"] = (_hex_or_wild(p) for p in parts)
            fields["id"] = True
            i += 1
        elif key in ("serial", "name"):
            operator, values, i = _take_set(tokens, i, where)
            if operator not in ("equals", "one-of", "none-of"):
                raise UsbRuleError(f"{where}: {key} supports equals, one-of, none-of, not {operator}")
            fields[key] = StringCondition(operator, tuple(values))
        elif key == "with-interface":
            operator, values, i = _take_set(tokens, i, where)
            fields[key] = InterfaceCondition(operator, tuple(_interface_pattern(v, where) for v in values))
        else:
            raise UsbRuleError(f"{where}: unsupported attribute {key!r}")
    serial = fields.get("serial")
    name = fields.get("name")
    ifaces = fields.get("with-interface")
    vendor = fields.get("vendor")
    product = fields.get("product")
    return UsbRule(
        target=target,
        text=text.strip(),
        vendor=vendor if isinstance(vendor, int) else None,
        product=product if isinstance(product, int) else None,
        id_given="id" in fields,
        serial=serial if isinstance(serial, StringCondition) else None,
        name=name if isinstance(name, StringCondition) else None,
        interfaces=ifaces if isinstance(ifaces, InterfaceCondition) else None,
    )


def parse_rules(texts: list[str]) -> list[UsbRule]:
    return [parse_rule(text, index=n) for n, text in enumerate(texts)]


@dataclass(frozen=True)
class UsbVerdict:
    target: Target
    rule: str  # the matching rule's text, or "implicit block"
    reason: str
    forbidden_interfaces: tuple[str, ...] = field(default=())


def first_match(rules: list[UsbRule], device: UsbDevice) -> tuple[Target, str]:
    for rule in rules:
        if rule.matches(device):
            return rule.target, rule.text
    return Target.BLOCK, "implicit block"


def judge_device(rules: list[UsbRule], device: UsbDevice) -> UsbVerdict:
    """First match wins; then the BadUSB check: a device with several interfaces is also judged one
    interface at a time (same id, serial, name), and if any interface alone would not be allowed the
    whole device is rejected — a "keyboard" that also brings mass storage or a network card is refused
    whole, not half-authorized."""
    target, rule = first_match(rules, device)
    if target is not Target.ALLOW:
        return UsbVerdict(target, rule, f"matched {rule!r}")
    if len(device.interfaces) > 1:
        forbidden = tuple(
            str(iface)
            for iface in device.interfaces
            if first_match(rules, _with_interfaces(device, (iface,)))[0] is not Target.ALLOW
        )
        if forbidden:
            return UsbVerdict(
                Target.REJECT,
                rule,
                f"composite device with forbidden interface(s) {', '.join(forbidden)}",
                forbidden,
            )
    return UsbVerdict(Target.ALLOW, rule, f"matched {rule!r}")


def _with_interfaces(device: UsbDevice, interfaces: tuple[Interface, ...]) -> UsbDevice:
    return UsbDevice(device.vendor, device.product, device.serial, device.name, interfaces)


def is_hid_only(device: UsbDevice) -> bool:
    """Every interface is HID (class 03): keyboards, mice, and nothing else."""
    return bool(device.interfaces) and all(i.cls == 0x03 for i in device.interfaces)
