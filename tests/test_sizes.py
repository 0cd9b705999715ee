"""Byte sizes: the units decided in liftedge.sizes, and clear errors for anything else."""

from __future__ import annotations

import pytest

from liftedge.errors import LiftedgeError
from liftedge.sizes import format_size, parse_size


@pytest.mark.parametrize("text, nbytes", [
    ("4GB", 4 * 10**9),           # decimal with a B
    ("4GiB", 4 * 2**30),          # binary, explicit
    ("3.5G", int(3.5 * 2**30)),   # bare G is binary, as in dd/docker/numfmt --from=iec
    ("512MB", 512 * 10**6),
    ("512M", 512 * 2**20),
    ("512MiB", 512 * 2**20),
    ("1.5T", int(1.5 * 2**40)),
    ("1.5TB", int(1.5 * 10**12)),
    ("8kb", 8000),                # case does not matter
    (" 6 gb ", 6 * 10**9),
    ("4096", 4096),               # plain integers are bytes
    ("100B", 100),
    (".5K", 512),
    (4096, 4096),
])
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "GB", "four GB", "4 GBs", "4XB", "4..5G", "1e3", "-4GB", "0", "0GB", "0.0001B",
                                  "-1", True])
def test_parse_size_refuses_garbage_zero_and_negative(text):
    with pytest.raises(LiftedgeError, match="size"):
        parse_size(text)


def test_error_message_lists_the_forms():
    with pytest.raises(LiftedgeError, match=r"512MB.*powers of 1000.*powers of 1024"):
        parse_size("lots")


@pytest.mark.parametrize("nbytes, text", [(100, "100 B"), (1536, "1.50 KiB"), (6 * 2**30, "6.00 GiB"),
                                          (int(12.5 * 2**20), "12.5 MiB"), (300 * 2**30, "300 GiB")])
def test_format_size(nbytes, text):
    assert format_size(nbytes) == text


@pytest.mark.parametrize("nbytes", [1, 999, 1024, 123_456_789, 7 * 2**30 + 12345, 3 * 2**40])
def test_format_then_parse_is_within_half_a_percent(nbytes):
    # format_size keeps 3 significant digits: rounding error <= 0.05 / 10 = 0.5%.
    back = parse_size(format_size(nbytes).replace(" ", ""))
    assert abs(back - nbytes) <= 0.005 * nbytes + 1
