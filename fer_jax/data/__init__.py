"""Datasets: importing a module registers its loaders in ``DATASETS``."""
from fer_jax.data.base import ArraySplit, DATASETS, Dataset, as_arrays  # noqa: F401
from fer_jax.data import synthetic  # noqa: F401
from fer_jax.data import real  # noqa: F401
