"""Test helpers. The case builders live in the package (fastlora.cases) because
`fastlora verify` and the benchmarks use them too; tests may append their own helpers below."""

from fastlora.cases import (  # noqa: F401
    DEVICE, DTYPES, LoraCase, bnb_weight, fused, make_case, reference_pair, run)
