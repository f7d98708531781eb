"""USBGuard rule subset: parser and matcher (pure)."""

from __future__ import annotations

import pytest

from cleanroom_agent.enforcers.usbrules import (
    Interface,
    Target,
    UsbDevice,
    UsbRuleError,
    is_hid_only,
    judge_device,
    parse_rule,
    parse_rules,
)
from cleanroom_protocol.policy import DEFAULT_USB_RULES

KBD = Interface(3, 1, 1)
MOUSE = Interface(3, 1, 2)
STORAGE = Interface(8, 6, 0x50)
CCID = Interface(0x0B, 0, 0)


def dev(
    *ifaces: Interface, vid: int = 0x046D, pid: int = 0xC31C, serial: str = "", name: str = ""
) -> UsbDevice:
    return UsbDevice(vid, pid, serial, name, tuple(ifaces))


def test_default_rules_allow_keyboard_mouse_ccid_and_block_storage() -> None:
    rules = parse_rules(DEFAULT_USB_RULES)
    assert judge_device(rules, dev(KBD)).target is Target.ALLOW
    assert judge_device(rules, dev(KBD, MOUSE)).target is Target.ALLOW
    assert judge_device(rules, dev(CCID)).target is Target.ALLOW
    assert judge_device(rules, dev(STORAGE)).target is Target.BLOCK
    assert judge_device(rules, dev(Interface(0xE0, 1, 1))).target is Target.BLOCK
    assert judge_device(rules, dev()).target is Target.BLOCK


def test_composite_with_forbidden_interface_is_rejected_whole() -> None:
    verdict = judge_device(parse_rules(DEFAULT_USB_RULES), dev(KBD, STORAGE))
    assert verdict.target is Target.REJECT
    assert verdict.forbidden_interfaces == ("08:06:50",)
    assert "composite" in verdict.reason


def test_id_wildcards_serial_and_name() -> None:
    rules = parse_rules(
        [
            'allow id 0781:5581 serial "4C530001" with-interface 08:06:50',
            'reject name one-of { "Evil Stick" "Rubber Ducky" }',
            "allow id 1050:*",
        ]
    )
    assert judge_device(rules, dev(STORAGE, vid=0x0781, pid=0x5581, serial="4C530001")).target is Target.ALLOW
    assert judge_device(rules, dev(STORAGE, vid=0x0781, pid=0x5581, serial="OTHER")).target is Target.BLOCK
    assert judge_device(rules, dev(KBD, name="Rubber Ducky")).target is Target.REJECT
    assert judge_device(rules, dev(CCID, vid=0x1050, pid=0x0407)).target is Target.ALLOW


@pytest.mark.parametrize(
    ("op", "ifaces", "expected"),
    [
        ("one-of", (KBD, STORAGE), True),
        ("one-of", (STORAGE,), False),
        ("all-of", (KBD, MOUSE, STORAGE), True),
        ("all-of", (KBD,), False),
        ("none-of", (STORAGE,), True),
        ("none-of", (KBD,), False),
        ("equals", (KBD, MOUSE), True),
        ("equals", (KBD,), False),
        ("equals", (KBD, MOUSE, STORAGE), False),
        ("match-all", (KBD,), True),
        ("match-all", (KBD, STORAGE), False),
    ],
)
def test_interface_operators(op: str, ifaces: tuple[Interface, ...], expected: bool) -> None:
    rule = parse_rule(f"allow with-interface {op} {{ 03:01:01 03:01:02 }}")
    assert rule.matches(dev(*ifaces)) is expected


def test_single_interface_means_equals_and_wildcards() -> None:
    rule = parse_rule("allow with-interface 03:*:*")
    assert rule.matches(dev(KBD, MOUSE))
    assert not rule.matches(dev(KBD, STORAGE))


def test_first_match_wins_and_implicit_block() -> None:
    rules = parse_rules(["block id 046d:c31c", "allow"])
    assert judge_device(rules, dev(KBD)).target is Target.BLOCK
    assert judge_device(rules, dev(KBD, pid=1)).target is Target.ALLOW
    verdict = judge_device([], dev(KBD))
    assert (verdict.target, verdict.rule) == (Target.BLOCK, "implicit block")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("permit", "target must be"),
        ("allow via-port 1-1", "unsupported attribute 'via-port'"),
        ("allow id 12:34", "bad id"),
        ("allow with-interface 3:1", "bad interface"),
        ("allow with-interface one-of { 03:01:01", "unclosed"),
        ('allow serial "abc', "No closing quotation"),
        ("allow id 1234:5678 id 1234:5678", "given twice"),
        ("allow serial all-of { a }", "supports equals"),
        ("allow with-interface one-of 03:00:00", "needs a"),
    ],
)
def test_bad_rules_are_named(text: str, fragment: str) -> None:
    with pytest.raises(UsbRuleError, match="usb rule 3") as info:
        parse_rules(["allow", "block", text])
    assert fragment in str(info.value)


def test_hid_only() -> None:
    assert is_hid_only(dev(KBD, MOUSE))
    assert not is_hid_only(dev(KBD, STORAGE))
    assert not is_hid_only(dev())
