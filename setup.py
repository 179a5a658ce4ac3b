"""pyfused: fused Triton kernels for small-MLP training.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are installed as
``pyfused.kernels`` (a top-level ``kernels`` package would clash with an existing PyPI name).
"""
from setuptools import setup

setup(
    name="pyfused",
    version="0.1.0",
    description="Fused Triton kernels for small-MLP training (forward, loss, backward, momentum SGD)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["pyfused", "pyfused.cli", "pyfused.kernels"],
    package_dir={"pyfused": "pyfused", "pyfused.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",  # the oldest torch CI tests (.ci/run: 2.11.0, the GPU machine's)
        "torchvision",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "matplotlib", "tqdm", "expecttest"],  # expecttest: torch.testing._internal.common_optimizers
        "train": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["pyfused-train = pyfused.cli.train:main"]},
)
