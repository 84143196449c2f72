"""Federated datasets: real offline sources, partitioners, TFDS loaders, padding."""

from jaxfl.data._sources import ArrayDataset as ArrayDataset
from jaxfl.data._sources import load_digits as load_digits
from jaxfl.data._sources import load_fashion_mnist as load_fashion_mnist
from jaxfl.data._sources import load_mnist5k as load_mnist5k
