"""USB descriptors as USBGuard reads them from sysfs ``descriptors``, and USBGuard's device hash. Pure.

The kernel's ``descriptors`` file holds the device descriptor followed by every configuration descriptor
(with its interface, endpoint and class descriptors), raw, as the device sent them.

Walk (USBGuard ``USBDescriptorParser::parse`` and ``DevicePrivate::load*Descriptor``): each descriptor is
``bLength, bDescriptorType, …``. A partial header, ``bLength < 2`` or a ``bLength`` past the end is an
error; device descriptors must be 18 bytes, configuration and interface descriptors 9, endpoint
descriptors 7 or 9; a second device descriptor, a configuration before the device descriptor, an
interface before a configuration or an endpoint before an interface is an error; less than 18 bytes in
all is an error. USBGuard refuses such a device (it is never authorized); so does the agent. Every
interface descriptor counts, alternate settings and every configuration included, duplicates kept.

Hash (USBGuard ``DevicePrivate::initializeHash``/``updateHash``/``finalizeHash``, ``DeviceBase::
parseUSBDescriptor``, ``Hash.cpp``): SHA-256 over the name (sysfs ``product``), ``idVendor``,
``idProduct`` and ``serial`` as sysfs gives them (trailing NUL, LF, CR, TAB, BS trimmed; absent = empty),
concatenated without separators, then over every descriptor's raw bytes in file order, except that a
Linux root hub's device descriptor (idVendor 1d6b, idProduct 0001/0002/0003) is hashed with
``bcdDevice`` zeroed (it carries the kernel version). The digest is written in standard base64 with
padding. USBGuard builds it with libsodium, OpenSSL or libgcrypt SHA-256: the same function as
``hashlib.sha256``. The ``parent-hash`` of a device whose parent is a USB device (a hub, a root hub) is
the parent's hash; for a root hub it is the SHA-256/base64 of its parent's sysfs path (e.g.
``/devices/pci0000:00/0000:00:14.0``).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cleanroom_protocol.usbrules import Interface

DEVICE, CONFIGURATION, INTERFACE, ENDPOINT = 1, 2, 4, 5
_SIZES = {DEVICE: (18,), CONFIGURATION: (9,), INTERFACE: (9,), ENDPOINT: (7, 9)}
_NAMES = {DEVICE: "device", CONFIGURATION: "configuration", INTERFACE: "interface", ENDPOINT: "endpoint"}
_LINUX_FOUNDATION = 0x1D6B
_ROOT_HUB_PRODUCTS = (0x0001, 0x0002, 0x0003)
_PARENT = {CONFIGURATION: DEVICE, INTERFACE: CONFIGURATION, ENDPOINT: INTERFACE}


class DescriptorError(ValueError):
    """Descriptor data USBGuard would refuse; the message says what and at which byte."""


@dataclass(frozen=True)
class Descriptors:
    interfaces: tuple[Interface, ...]
    vendor: int
    product: int
    hashed: bytes  # what USBGuard feeds its hash after the string fields


def read_descriptors(raw: bytes) -> Descriptors:
    interfaces: list[Interface] = []
    chunks: list[bytes] = []
    seen: set[int] = set()
    vendor = product = 0
    pos = 0
    while pos < len(raw):
        if pos + 2 > len(raw):
            raise DescriptorError(f"partial descriptor header at byte {pos}")
        length, kind = raw[pos], raw[pos + 1]
        if length < 2:
            raise DescriptorError(f"bLength {length} < 2 at byte {pos}")
        if pos + length > len(raw):
            raise DescriptorError(f"bLength {length} at byte {pos} runs past the end ({len(raw)} bytes)")
        desc = raw[pos : pos + length]
        sizes = _SIZES.get(kind)
        if sizes is not None and length not in sizes:
            raise DescriptorError(f"{_NAMES[kind]} descriptor of {length} bytes at byte {pos}")
        parent = _PARENT.get(kind)
        if parent is not None and parent not in seen:
            raise DescriptorError(f"{_NAMES[kind]} descriptor without a {_NAMES[parent]} before it")
        if kind == DEVICE:
            if DEVICE in seen:
                raise DescriptorError(f"second device descriptor at byte {pos}")
            vendor = desc[8] | desc[9] << 8
            product = desc[10] | desc[11] << 8
            if vendor == _LINUX_FOUNDATION and product in _ROOT_HUB_PRODUCTS:
                desc = desc[:12] + b"\0\0" + desc[14:]  # bcdDevice: the kernel version
        elif kind == CONFIGURATION:
            seen.discard(INTERFACE)
            seen.discard(ENDPOINT)
        elif kind == INTERFACE:
            interfaces.append(Interface(desc[5], desc[6], desc[7]))
        seen.add(kind)
        chunks.append(desc)
        pos += length
    if pos < 18:
        raise DescriptorError(f"{pos} bytes of descriptors, less than a device descriptor")
    return Descriptors(tuple(interfaces), vendor, product, b"".join(chunks))


def parse_descriptors(raw: bytes) -> tuple[Interface, ...]:
    """The interface list of a device, as USBGuard's ``with-interface`` sees it."""
    return read_descriptors(raw).interfaces


def device_hash(*, name: bytes, vendor_id: bytes, product_id: bytes, serial: bytes, hashed: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in (name, vendor_id, product_id, serial, hashed):
        digest.update(part)
    return base64.b64encode(digest.digest())


def string_hash(value: bytes) -> bytes:
    """USBGuard's ``hashString``: the parent-hash of a root hub is this over its parent's sysfs path."""
    return base64.b64encode(hashlib.sha256(value).digest())
