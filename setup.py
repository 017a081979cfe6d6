"""Packaging for moa. `kernels/` and `training/` install as `moa.kernels` and `moa.training`; `configs/` as
`moa.configs` and the tiny training set `data/tiny/` as `moa/data/tiny/`, the same layout relative to each other
as in the repository, so the relative paths inside the configs hold in an installed copy (see moa/resources.py)."""
from setuptools import find_packages, setup

moa_packages = find_packages(include=["moa", "moa.*"])

setup(
    name="moa",
    version="0.1.0",
    description="One model, many cultures: culture LoRAs behind a token-level router, fused multi-LoRA kernels",
    python_requires=">=3.10",
    packages=moa_packages + ["moa.kernels", "moa.kernels.multi_lora", "moa.training", "moa.configs", "moa.data.tiny"],
    package_dir={"moa.kernels": "kernels", "moa.training": "training", "moa.configs": "configs", "moa.data.tiny": "data/tiny"},
    package_data={"moa": ["data/bundled/**/*", "data/bundled/*"], "moa.kernels.multi_lora": ["csrc/*.cpp"],
                  "moa.configs": ["*/*.yaml", "*/*.json"], "moa.data.tiny": ["*.jsonl", "*.json"]},
    include_package_data=True,
    # Every range was tested: its floor by `.ci/oldest` (the oldest versions allowed), its upper bound by
    # `.ci/latest` (the newest allowed); `constraints.txt` pins the set the whole suite passed on.
    install_requires=[
        "torch>=2.13,<2.14",  # older torch has no CPU-only wheel on PyPI to test with
        "transformers>=4.57.1,<5.25",  # 4.57.0 is yanked; internals move between minor releases: moa/compat.py reads them
        "peft>=0.17,<0.22",
        "bitsandbytes>=0.47,<0.51",  # 0.47: nf4 on CPU
        "deepspeed>=0.19,<0.20",  # 0.18.x: ZeRO-2 on 2 processes diverges from 1 process at step 2
        "triton>=3.7,<3.10",  # torch 2.13's CUDA build ships triton 3.7.1
        "einops>=0.8,<0.9",
        "ninja>=1.11.1,<1.14",  # builds the native CPU decode kernel on first use (torch.utils.cpp_extension)
        "safetensors>=0.5.3,<0.9",
        "pyyaml>=6.0.1,<7",
        "tqdm>=4.66,<4.71",
        "matplotlib>=3.8,<3.12",
        "numpy>=1.26.4,<2.5",
        "starlette>=1.10,<1.11",  # moa serve: the HTTP app
        "uvicorn>=0.55,<0.56",  # moa serve: the HTTP server
        "httpx2>=2.16.2,<2.17",  # moa serve --upstream: the client that forwards to the upstream server
    ],
    extras_require={"dev": ["pytest>=8.2,<9.3", "openai>=3.57,<3.58", "lm-eval[api]>=0.4.13,<0.5"], "tensorboard": ["tensorboard"]},
    entry_points={"console_scripts": ["moa=moa.cli:main"]},
)
