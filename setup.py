from glob import glob

from setuptools import find_packages, setup

setup(
    name="tensorpress",
    version="0.1.0",
    description="Post-training compression of LLMs: low-rank, 4-bit quantisation and pruning, "
                "with servable checkpoints and fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tensorpress", "tensorpress.*"]),
    data_files=[("share/tensorpress/configs", glob("configs/*.yaml"))],
    install_requires=[
        "torch>=2.11",
        "transformers>=5.15",
        "accelerate",
        "safetensors",
        "numpy",
        "pyyaml",
        "tqdm",
        "gguf",
    ],
    extras_require={
        "kernels": ["triton>=3.6,<3.10"],
        "bench": ["matplotlib"],
        "test": ["pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "datasets"],
    },
    entry_points={"console_scripts": ["tensorpress = tensorpress.cli:main"]},
)
