"""Federated datasets: real offline sources, partitioners, TFDS loaders, padding."""

from jaxfl.data._device import DeviceData as DeviceData
from jaxfl.data._device import device_data as device_data
from jaxfl.data._federated import FederatedData as FederatedData
from jaxfl.data._federated import federate as federate
from jaxfl.data._federated import from_client_indices as from_client_indices
from jaxfl.data._fortunes import FORTUNE_TOPICS as FORTUNE_TOPICS
from jaxfl.data._fortunes import FortunesText as FortunesText
from jaxfl.data._fortunes import federate_tokens as federate_tokens
from jaxfl.data._fortunes import fortune_topics as fortune_topics
from jaxfl.data._fortunes import fortunes_text as fortunes_text
from jaxfl.data._fortunes import load_fortunes as load_fortunes
from jaxfl.data._fortunes import pack_tokens as pack_tokens
from jaxfl.data._fortunes import read_fortunes as read_fortunes
from jaxfl.data._fortunes import tokenize_texts as tokenize_texts
from jaxfl.data._fortunes import unpack_tokens as unpack_tokens
from jaxfl.data._load import DATASETS as DATASETS
from jaxfl.data._load import load as load
from jaxfl.data._load import random_images as random_images
from jaxfl.data._partition import PARTITIONERS as PARTITIONERS
from jaxfl.data._partition import dirichlet as dirichlet
from jaxfl.data._partition import from_index_files as from_index_files
from jaxfl.data._partition import iid as iid
from jaxfl.data._partition import quantity_skew as quantity_skew
from jaxfl.data._partition import shards as shards
from jaxfl.data._sources import ArrayDataset as ArrayDataset
from jaxfl.data._sources import load_digits as load_digits
from jaxfl.data._sources import load_fashion_mnist as load_fashion_mnist
from jaxfl.data._sources import load_mnist5k as load_mnist5k
from jaxfl.data._synthetic import synthetic as synthetic
from jaxfl.data._validate import validate as validate


def load_tfds(*args, **kwargs):
  """Lazy wrapper of :func:`jaxfl.data._tfds.load_tfds` (imports TFDS only when called)."""
  from jaxfl.data._tfds import load_tfds as _load_tfds

  return _load_tfds(*args, **kwargs)


__all__ = ["DATASETS", "FORTUNE_TOPICS", "PARTITIONERS", "ArrayDataset", "DeviceData",
           "FederatedData", "FortunesText", "device_data", "dirichlet", "federate",
           "federate_tokens", "fortune_topics", "fortunes_text", "from_client_indices",
           "from_index_files", "iid", "load", "load_digits", "load_fashion_mnist", "load_fortunes",
           "load_mnist5k", "load_tfds", "pack_tokens", "quantity_skew", "random_images",
           "read_fortunes", "shards", "synthetic", "tokenize_texts", "unpack_tokens", "validate"]
