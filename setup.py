"""Package metadata for rlhfjax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "chex>=0.1.90,<0.2",
    "orbax-checkpoint>=0.12,<0.13",
    "tensorflow-datasets>=4.9.9,<5",
    "array_record>=0.8,<0.9",
    # tensorflow-datasets imports it for package-defined builders but declares it only for
    # Python < 3.9.
    "importlib_resources>=6",
    "ml_collections>=1.0,<2",
    "numpy>=1.26,<3",
    "tqdm>=4.66,<5",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
    "pyarrow>=14",  # Parquet sources of the real-dataset builders.
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8,<10",
        "pytest-xdist>=3.5,<4",
        "scipy>=1.11,<2",
        "nbformat>=5.9,<6",
        "nbclient>=0.10,<0.12",
        "ipykernel>=6.29,<8",
    ],
    "notebooks": ["jupyterlab>=4,<5", "ipykernel>=6.29,<8"],
    # jinja2: transformers renders chat templates with it but does not require it.
    "hf": ["transformers>=4.45,<6", "safetensors>=0.4,<1", "tokenizers>=0.20,<1",
           "sentencepiece>=0.2,<1", "jinja2>=3.1,<4"],
    # experiments.bench.train_step drives TRL 1.x's DPOTrainer / GRPOTrainer (whose model calls
    # need transformers 5); any CPU torch 2.x they accept, e.g. the 2.13.0 CPU build CI installs.
    "bench": ["torch>=2.4,<3", "transformers>=5.2,<6", "trl>=1.16,<2", "datasets>=3,<6",
              "accelerate>=1.4,<2"],
}

setuptools.setup(
    name="rlhfjax",
    version="0.1.0",
    description="Aligning language models with human feedback in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["rlhfjax", "rlhfjax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
