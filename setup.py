"""Package definition for glam_jax: sparse Mixture-of-Experts language models in JAX/Flax."""

from setuptools import find_packages, setup

# The lm-evaluation-harness adapter (glam_jax/lm_eval_model.py); 0.4.x is the API it implements.
LM_EVAL = ["lm-eval>=0.4.5,<0.5"]

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
        # lm-eval is in the test extras so CI runs tests/test_lm_eval.py (its base install has
        # no torch or transformers: about 40 s and 0.75 GB in a fresh venv, mostly pyarrow,
        # scipy, scikit-learn and pandas, which `datasets` and `evaluate` need).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff==0.17.6",
            "matplotlib>=3.8",
            *LM_EVAL,
        ],
        "plots": ["matplotlib>=3.8"],
        "eval": LM_EVAL,
    },
    entry_points={
        "console_scripts": [
            "glam-train = glam_jax.commands.train:entry",
            "glam-eval = glam_jax.commands.eval:entry",
            "glam-generate = glam_jax.commands.generate:entry",
            "glam-param-count = glam_jax.param_count:entry",
            "glam-lm-eval = glam_jax.commands.lm_eval:entry",
        ]
    },
)
