"""The test tiers and CI's rotation (tests/conftest.py; README "Developing"): the quick tier
is what is marked quick, the default tier leaves out what is marked full, --slice parts
partition, --shuffle only reorders."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _collect(*args) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-p", "no:randomly", *args],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "::" in line]


@pytest.mark.full("seven pytest collections (~40 s): the tooling is checked by rotation")
def test_tiers_slices_and_shuffle_select_what_they_say():
    files = ["tests/test_forward.py", "tests/test_patch.py"]
    full = _collect(*files, "--tier", "full")
    default = _collect(*files)
    quick = _collect(*files, "--tier", "quick")
    # default = full less the tests marked full; quick is a part of default
    assert set(default) < set(full) and set(quick) < set(default) and quick
    assert {t for t in full if "test_training_losses_agree[" in t} - set(default) == {
        f"tests/test_patch.py::test_training_losses_agree[{v}]"
        for v in ("ckpt-reentrant", "ckpt-non_reentrant", "plain-dequant")}
    assert "tests/test_forward.py::test_small_and_tiled_paths_agree" in quick
    # slice 0 of 2, shuffled: a part of the default tier in another order; slice 1 of 2 of
    # the full tier holds the rest of the default tier
    part = _collect(*files, "--slice", "0/2", "--shuffle", "3")
    rest = [t for t in default if t not in part]
    assert part and rest and [t for t in default if t in part] != part
    assert set(rest) <= set(_collect(*files, "--tier", "full", "--slice", "1/2"))
