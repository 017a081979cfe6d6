"""Packaging for moa. `kernels/` and `training/` install as `moa.kernels` and `moa.training`."""
from setuptools import find_packages, setup

moa_packages = find_packages(include=["moa", "moa.*"])

setup(
    name="moa",
    version="0.1.0",
    description="One model, many cultures: culture LoRAs behind a token-level router, fused multi-LoRA kernels",
    python_requires=">=3.10",
    packages=moa_packages + ["moa.kernels", "moa.training"],
    package_dir={"moa.kernels": "kernels", "moa.training": "training"},
    package_data={"moa": ["data/bundled/**/*", "data/bundled/*"], "moa.kernels": ["csrc/*.cpp"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.46",
        "peft>=0.13",
        "bitsandbytes>=0.47",
        "deepspeed>=0.15",
        "triton>=3.0",
        "einops",
        "ninja",  # builds the native CPU decode kernel on first use (torch.utils.cpp_extension)
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={"dev": ["pytest>=8"], "tensorboard": ["tensorboard"]},
    entry_points={"console_scripts": ["moa=moa.cli:main"]},
)
