from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="compressm",
    version="0.1.0",
    description="CompreSSM for Hugging Face: LRU state-space models that shrink themselves while they train "
    "(in-training balanced truncation, arXiv 2510.02823).",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels package lives in `kernels/compressm_kernels/`; `kernels/` is a plain folder without `__init__.py`:
    # a top-level package named `kernels` belongs to Hugging Face's hub-kernels library, which transformers imports
    # (from 5.25 when generating), and a checkout's root on sys.path must not shadow it.
    # The repository folder `hub_configs/` (JSON model presets) is installed as `modeling_compressm.hub_configs`.
    # modeling_compressm: the remote-code bundle (flat, as transformers copies it); .training: the training library;
    # .app: the command-line application.
    packages=[
        "modeling_compressm",
        "modeling_compressm.training",
        "modeling_compressm.app",
        "modeling_compressm.hub_configs",
        "compressm_kernels",
    ],
    package_dir={
        "modeling_compressm": "modeling_compressm",
        "modeling_compressm.hub_configs": "hub_configs",
        "compressm_kernels": "kernels/compressm_kernels",
    },
    package_data={"modeling_compressm.hub_configs": ["*.json"]},
    # Each entry is used: accelerate by the Trainer, datasets and tokenizers by `compressm train --dataset`
    # (text_data.py, tokenization.py), scikit-learn for the offline digits. `evaluate` is not a dependency: the
    # metrics (loss, perplexity, bits per byte, accuracy) are computed directly, and evaluate would fetch its metric
    # modules from the Hub at run time.
    install_requires=[
        "torch>=2.4",
        # Tested at both ends in CI (.ci/run): the lower bound here, and the newest release.
        "transformers>=4.56.2,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "tokenizers>=0.19",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "scikit-learn>=1.3",
    ],
    extras_require={
        # parameterized: imported by transformers' own model test mixins (tests/test_modeling_common.py)
        "test": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6", "matplotlib>=3.7", "parameterized",
                 # scipy: the independent reference of benchmarks/posthoc_vs_scipy.py, which tests/test_lm_study.py runs
                 "scipy"],
    },
    entry_points={"console_scripts": ["compressm=modeling_compressm.app.cli:main"]},
)
