"""SIZE parsing for --budget."""

from __future__ import annotations

import pytest

from spac_llamacpp.base.errors import SpacError
from spac_llamacpp.base.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("123456", 123456),
        ("0", 0),
        ("512KiB", 512 * 1024),
        ("6GiB", 6 << 30),
        ("6gib", 6 << 30),
        ("1.5GiB", 3 << 29),
        ("4G", 4 << 30),
        ("64M", 64 << 20),
        ("10B", 10),
        ("2 MiB", 2 << 20),
        ("1GB", 10**9),
        ("500kB", 500_000),
        ("1TiB", 1 << 40),
        (123, 123),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5", "5XB", "1.2.3GiB", "GiB", "5 6", "1e3"])
def test_parse_size_errors_are_one_line(text):
    with pytest.raises(SpacError) as exc:
        parse_size(text)
    msg = str(exc.value)
    assert "\n" not in msg and "size" in msg


def test_format_size():
    assert format_size(6 << 30) == "6.00 GiB"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(12) == "12 B"
