"""The dependency versions fastlora supports: one place, read by setup.py (install_requires),
by the GPU check (benchmarks/gpu_check.sh) and by tests/test_support.py. README.md's "Support
range" says why each floor is where it is; .ci/support-range runs the oldest of each.

Plain data and the standard library only: setup.py loads this file before anything is
installed."""

from __future__ import annotations

from importlib import metadata

# Oldest supported release of each dependency (inclusive).
MINIMUM = {
    "torch": "2.9",           # torch 2.9 ships Triton 3.5, the oldest Triton below
    "triton": "3.5",          # what torch 2.9 .. 2.13 ship: 3.5, 3.6, 3.6, 3.7, 3.7
    "transformers": "5.0",    # 5.0.0, January 2026
    "peft": "0.18",           # 0.18.0, November 2025
    "bitsandbytes": "0.50",   # 0.49.x: its CPU 4-bit path disagrees with its own format
}
# Optional integrations (`pip install fastlora[trl]`): the oldest release tested with them
# (tests/test_trl.py, on requirements-dev.txt's pins). Liger-Kernel composes with the patch
# only on a GPU (README "With TRL"); requirements-dev.txt pins it for the CPU check.
EXTRAS = {"trl": {"trl": "1.16"}}
# First release not supported (exclusive): a Triton newer than the newest checked one may
# change codegen (spills) or the interpreter the corrections in fastlora/interpreter.py fit.
BELOW = {"triton": "3.10"}
# The Triton release of each supported minor version that .ci/support-range checks (the compile
# report and an interpreter run), oldest first; the last is requirements-dev.txt's pin, which
# the full suite runs on.
CHECKED_TRITONS = ("3.5.1", "3.6.0", "3.7.1", "3.8.0", "3.9.0")


def requirements() -> list[str]:
    """install_requires strings, e.g. 'triton>=3.5,<3.10'."""
    out = []
    for name, low in MINIMUM.items():
        spec = f"{name}>={low}"
        if name in BELOW:
            spec += f",<{BELOW[name]}"
        out.append(spec)
    return out


def extras() -> dict[str, list[str]]:
    """extras_require, e.g. {'trl': ['trl>=1.16', 'liger-kernel>=0.8']}."""
    return {extra: [f"{name}>={low}" for name, low in pins.items()]
            for extra, pins in EXTRAS.items()}


def _release(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '3.5.0rc1' -> (3, 5, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def in_range(name: str, version: str) -> bool:
    got = _release(version)
    if got < _release(MINIMUM[name]):
        return False
    return name not in BELOW or got < _release(BELOW[name])


def installed_version(name: str) -> str | None:
    """The installed distribution's version; for a Triton installed under another name
    (pytorch-triton nightlies), the module's own __version__."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    if name == "triton":
        try:
            import triton
        except ImportError:
            return None
        return triton.__version__
    return None


def problems(installed: dict[str, str | None] | None = None) -> list[str]:
    """One line per dependency that is missing or outside the range; [] when all fit.
    `installed` maps name -> version (None: not installed); default: what is installed."""
    if installed is None:
        installed = {name: installed_version(name) for name in MINIMUM}
    found = []
    for name in MINIMUM:
        version = installed.get(name)
        wanted = next(r for r in requirements() if r.startswith(name + ">="))
        if version is None:
            found.append(f"{name} is not installed (fastlora needs {wanted})")
        elif not in_range(name, version):
            found.append(f"{name} {version} is outside the supported range {wanted}")
    return found
