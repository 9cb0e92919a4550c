"""The support range has one source (fastlora/support.py): setup.py, the pinned and the oldest
requirement files and .ci/support-range agree with it, and its checks classify versions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastlora import support

pytestmark = pytest.mark.quick  # the whole module is in the quick tier


ROOT = Path(__file__).resolve().parent.parent


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_setup_py_states_the_range():
    text = (ROOT / "setup.py").read_text()
    assert "_support.requirements()" in text
    assert support.requirements() == ["torch>=2.9", "triton>=3.5,<3.10", "transformers>=5.0",
                                      "peft>=0.18", "bitsandbytes>=0.50"]


def test_the_oldest_stack_is_the_minimum():
    pins = _pins("requirements-oldest.txt")
    for name, low in support.MINIMUM.items():
        assert name in pins, f"requirements-oldest.txt does not pin {name}"
        assert support._release(pins[name])[:len(support._release(low))] == \
            support._release(low), f"{name}=={pins[name]} is not the minimum {low}"


def test_the_pinned_set_is_in_range():
    pins = _pins("requirements-dev.txt")
    assert not support.problems({name: pins[name] for name in support.MINIMUM})
    assert pins["triton"] == support.CHECKED_TRITONS[-1]


def test_every_supported_triton_minor_is_checked():
    low, high = support._release(support.MINIMUM["triton"]), support._release(support.BELOW["triton"])
    minors = [support._release(v)[:2] for v in support.CHECKED_TRITONS]
    assert minors == sorted(minors) and len(set(minors)) == len(minors)
    assert minors[0] == low[:2] and (minors[-1][0], minors[-1][1] + 1) == high[:2]
    assert all(support.in_range("triton", v) for v in support.CHECKED_TRITONS)
    script = (ROOT / ".ci" / "support-range").read_text()
    assert "CHECKED_TRITONS" in script and "t[:-1]" in script


@pytest.mark.parametrize("name,version,ok", [
    ("triton", "3.5.0", True), ("triton", "3.4.1", False), ("triton", "3.9.0", True),
    ("triton", "3.10.0", False), ("triton", "3.5.0rc1", True),
    ("torch", "2.13.0+cpu", True), ("torch", "2.8.0", False), ("torch", "2.9.1+cu128", True),
    ("torch", "2.10.0.dev20260101", True),
    ("bitsandbytes", "0.49.2", False), ("bitsandbytes", "0.50.0", True),
    ("transformers", "4.57.6", False), ("transformers", "5.0.0", True),
    ("peft", "0.17.1", False), ("peft", "0.18.0", True),
])
def test_in_range(name, version, ok):
    assert support.in_range(name, version) is ok


def test_problems_name_the_missing_and_the_out_of_range():
    found = support.problems({"torch": "2.8.0", "triton": "3.9.0", "transformers": "5.1.0",
                              "peft": None, "bitsandbytes": "0.50.2"})
    assert found == ["torch 2.8.0 is outside the supported range torch>=2.9",
                     "peft is not installed (fastlora needs peft>=0.18)"]


def test_the_running_stack_is_in_range():
    """Whatever stack runs this suite (pinned, oldest, or each Triton of .ci/support-range)."""
    assert support.problems() == []
