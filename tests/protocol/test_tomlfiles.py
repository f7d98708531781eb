"""tomlfiles: operator-written TOML read bounded, and every problem named by file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from cleanroom_protocol import tomlfiles

DOC = """\
# a comment
[sessions]
"clients" = ["xfreerdp"]

[[pool]]
id = "a"

[[pool]]
id = "b"
[[pool.desktop]]
id = "b-1"
overlay = 7
"""


class Broken(ValueError):
    pass


def test_line_of_finds_keys_in_quoted_tables_and_arrays_of_tables() -> None:
    assert tomlfiles.line_of(DOC, ("sessions", "clients")) == 3
    assert tomlfiles.line_of(DOC, ("pool", 0, "id")) == 6
    assert tomlfiles.line_of(DOC, ("pool", 1, "id")) == 9
    assert tomlfiles.line_of(DOC, ("pool", 1, "desktop", 0, "overlay")) == 12
    # a missing key is reported at its table
    assert tomlfiles.line_of(DOC, ("pool", 1, "desktop", 0, "golden")) == 10
    assert tomlfiles.line_of(DOC, ("nowhere",)) is None


def test_describe_names_source_line_and_field() -> None:
    class Desktop(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str
        overlay: str

    class Pool(BaseModel):
        id: str
        desktop: list[Desktop] = []

    class File(BaseModel):
        pool: list[Pool]

    data = tomlfiles.parse(DOC, source="d.toml", error=Broken)
    with pytest.raises(ValidationError) as caught:
        File.model_validate(data)
    assert tomlfiles.describe(caught.value, DOC, "d.toml") == (
        "d.toml:12: field pool.1.desktop.0.overlay: Input should be a valid string"
    )


def test_read_text_refuses_large_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * 11)
    with pytest.raises(Broken, match=r"big.toml: policy larger than 10 bytes"):
        tomlfiles.read_text(big, max_bytes=10, what="policy", error=Broken)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"a = '\xe9'")
    with pytest.raises(Broken, match=r"latin.toml: not UTF-8 \(byte 5\)"):
        tomlfiles.read_text(latin, max_bytes=100, what="policy", error=Broken)
    with pytest.raises(Broken, match=r"missing.toml: cannot read policy"):
        tomlfiles.read_text(tmp_path / "missing.toml", max_bytes=100, what="policy", error=Broken)
    with pytest.raises(Broken, match=r"x.toml: invalid TOML: .*line 2"):
        tomlfiles.parse("a = 1\nb = = 2", source="x.toml", error=Broken)
