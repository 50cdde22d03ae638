"""Package definition for glam_jax: sparse Mixture-of-Experts language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="glam_jax",
    version="0.1.0",
    description="GLaM-style sparse Mixture-of-Experts language models in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Only the library: configs/ and experiments/ are files of the checkout, not packages to
    # install (top-level names like `configs` would clash with other projects).
    packages=find_packages(include=["glam_jax", "glam_jax.*"]),
    package_data={"glam_jax.data": ["corpus/*.txt", "corpus/*.md"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.7",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "numpy>=1.26",
    ],
    extras_require={
        # ruff is pinned because CI checks the formatting, which changes between releases.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff==0.17.6", "matplotlib>=3.8"],
        "plots": ["matplotlib>=3.8"],
    },
)
