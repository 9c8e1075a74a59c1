"""Packaging for torchpcg.

The ``torch_dynamo_backends`` entry point lets ``torch.compile(m, backend="piecewise")``
find the backend in a process that never imported torchpcg.
"""
from setuptools import find_packages, setup

TEST_DEPS = ["pytest>=7", "pytest-xdist>=3", "depyf>=0.18", "transformers>=4.50", "matplotlib>=3.5", "tqdm>=4"]

setup(
    name="torchpcg",
    version="0.1.0",
    description="Piecewise CUDA graphs for any PyTorch inference model, as a torch.compile backend",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torchpcg", "torchpcg.*"]),
    python_requires=">=3.9",
    # numpy: torch warns "Failed to initialize NumPy" at import without it (the demo printed it)
    install_requires=["torch>=2.9", "numpy"],
    extras_require={"test": TEST_DEPS, "dev": TEST_DEPS},
    entry_points={"torch_dynamo_backends": ["piecewise = torchpcg.backend:piecewise_backend"]},
)
