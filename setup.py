"""Packaging for moa, distributed as `moa-cultures` (the name `moa` on PyPI is an unrelated 2014 tool); the import
package and the command are `moa`. `configs/` installs as `moa.configs` and the tiny training set `data/tiny/` as
`moa/data/tiny/`, the same layout relative to each other as in the repository, so the relative paths inside the
configs hold in an installed copy (see moa/resources.py)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
moa_packages = find_packages(include=["moa", "moa.*"])

setup(
    name="moa-cultures",
    version=re.search(r'^__version__ = "(.+)"$', (ROOT / "moa" / "__init__.py").read_text(), re.M)[1],
    description="One model, many cultures: culture LoRAs behind a token-level router, fused multi-LoRA kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    url="https://github.com/moa-cultures/moa-cultures",
    project_urls={"Source": "https://github.com/moa-cultures/moa-cultures",
                  "Issues": "https://github.com/moa-cultures/moa-cultures/issues",
                  "Documentation": "https://github.com/moa-cultures/moa-cultures/blob/main/docs/design.md"},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
    python_requires=">=3.10",
    packages=moa_packages + ["moa.configs", "moa.data.tiny"],
    package_dir={"moa.configs": "configs", "moa.data.tiny": "data/tiny"},
    package_data={"moa": ["data/bundled/**/*", "data/bundled/*"], "moa.kernels.multi_lora": ["csrc/*.cpp"],
                  "moa.configs": ["*/*.yaml", "*/*.json"], "moa.data.tiny": ["*.jsonl", "*.json"]},
    include_package_data=True,
    # Every range was tested: its floor by `.ci/oldest` (the oldest versions allowed), its upper bound by
    # `.ci/latest` (the newest allowed); `constraints.txt` pins the set the whole suite passed on. Libraries
    # whose internals moa reads are bounded by minor version; the others at their next major version.
    install_requires=[
        "torch>=2.13,<2.14",  # older torch has no CPU-only wheel on PyPI to test with
        "transformers>=4.57.1,<5.26",  # 4.57.0 is yanked; internals move between minor releases: moa/compat.py reads them
        "peft>=0.17,<0.22",  # moa/peft_io.py reads and writes its adapter layout
        "bitsandbytes>=0.47,<0.51",  # 0.47: nf4 on CPU; moa/bnb.py reads its quantized layers
        "deepspeed>=0.19,<0.20",  # 0.18.x: ZeRO-2 on 2 processes diverges from 1 process at step 2; fragment API
        "triton>=3.7,<3.10; platform_system == 'Linux'",  # torch 2.13's CUDA build ships triton 3.7.1; no wheel elsewhere
        "einops>=0.8,<1",
        "ninja>=1.11.1,<2",  # builds the native CPU decode kernel on first use (torch.utils.cpp_extension)
        "safetensors>=0.5.3,<1",
        "pyyaml>=6.0.1,<7",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "numpy>=1.26.4,<3",
        "starlette>=1.10,<2",  # moa serve: the HTTP app
        "uvicorn>=0.55,<1",  # moa serve: the HTTP server
        "httpx2>=2.16.2,<3",  # moa serve --upstream: the client that forwards to the upstream server
        "openai>=3.57,<4",  # moa synth: the OpenAI-compatible backend (AsyncOpenAI, retries, the Batch API)
    ],
    # One extra per experiment tracker (`report_to` in the training config); dev installs them all to test them.
    extras_require={"test": ["pytest>=8.2,<10", "lm-eval[api]>=0.4.13,<1"],
                    "dev": ["pytest>=8.2,<10", "lm-eval[api]>=0.4.13,<1", "tensorboard>=2.21,<3", "wandb>=0.31,<1",
                            "mlflow-skinny>=3.18,<4", "trackio>=0.43,<1"],
                    "tensorboard": ["tensorboard>=2.21,<3"],
                    "wandb": ["wandb>=0.31,<1"],
                    "mlflow": ["mlflow-skinny>=3.18,<4"],  # the client and its file store, without the server
                    # trackio needs huggingface_hub >= 1.10, which transformers < 5 excludes
                    "trackio": ["trackio>=0.43,<1"]},
    entry_points={"console_scripts": ["moa=moa.cli:main"]},
)
