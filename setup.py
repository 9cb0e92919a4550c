from setuptools import find_packages, setup

setup(
    name="fastlora",
    version="0.1.0",
    description="Triton kernels that fuse bitsandbytes 4-bit dequantization and LoRA for "
                "faster QLoRA training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastlora", "fastlora.*", "csrc_triton", "csrc_triton.*"]),
    package_data={"fastlora": ["data/*.txt"]},
    # open ranges for GPU users; the pinned dev/CI set is requirements-dev.txt
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "bitsandbytes>=0.49.2",
        "transformers>=4.45",
        "peft>=0.13",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
    entry_points={"console_scripts": ["fastlora=fastlora.cli:main"]},
)
