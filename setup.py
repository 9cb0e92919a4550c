import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

# the supported range lives in one place, fastlora/support.py (README.md "Support range")
_spec = importlib.util.spec_from_file_location(
    "_fastlora_support", Path(__file__).parent / "fastlora" / "support.py")
_support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_support)

setup(
    name="fastlora",
    version="0.1.0",
    description="Triton kernels that fuse bitsandbytes 4-bit dequantization and LoRA for "
                "faster QLoRA training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastlora", "fastlora.*", "csrc_triton", "csrc_triton.*"]),
    package_data={"fastlora": ["data/*.txt", "data/*.json"]},
    # the supported range for GPU users; the pinned dev/CI set is requirements-dev.txt, the
    # oldest supported set requirements-oldest.txt
    install_requires=_support.requirements() + [
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"],
                    **_support.extras()},
    entry_points={"console_scripts": ["fastlora=fastlora.cli:main"]},
)
