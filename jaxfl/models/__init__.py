"""Flax models as pure ``Model(init, apply)`` pairs, and adapters for user models."""

from jaxfl.models._bert import BertClassifier as BertClassifier
from jaxfl.models._bert import BertEncoder as BertEncoder
from jaxfl.models._bert import Tokens as Tokens
from jaxfl.models._bert import bert_model as bert_model
from jaxfl.models._bert import load_bert as load_bert
from jaxfl.models._bert import mean_pool as mean_pool
from jaxfl.models._bert import split_inputs as split_inputs
from jaxfl.models._bert import tokenize as tokenize
from jaxfl.models._factorised import BatchStatNorm as BatchStatNorm
from jaxfl.models._factorised import FactorisedConv as FactorisedConv
from jaxfl.models._factorised import FactorisedDense as FactorisedDense
from jaxfl.models._factorised import PrismCNN as PrismCNN
from jaxfl.models._factorised import PrismResNet as PrismResNet
from jaxfl.models._factorised import component_norms as component_norms
from jaxfl.models._factorised import eligible_conv as eligible_conv
from jaxfl.models._factorised import factor_layers as factor_layers
from jaxfl.models._factorised import factorise_kernel as factorise_kernel
from jaxfl.models._factorised import factorise_params as factorise_params
from jaxfl.models._factorised import gather_components as gather_components
from jaxfl.models._factorised import merge_factors as merge_factors
from jaxfl.models._factorised import merge_params as merge_params
from jaxfl.models._factorised import prism_cnn as prism_cnn
from jaxfl.models._factorised import prism_resnet18 as prism_resnet18
from jaxfl.models._factorised import refactorise as refactorise
from jaxfl.models._factorised import scatter_components as scatter_components
from jaxfl.models._hf_checkpoint import BertConfig as BertConfig
from jaxfl.models._hf_checkpoint import load_bert_config as load_bert_config
from jaxfl.models._hf_checkpoint import load_bert_params as load_bert_params
from jaxfl.models._hf_checkpoint import load_tokenizer as load_tokenizer
from jaxfl.models._hf_checkpoint import minilm_checkpoint_dir as minilm_checkpoint_dir
from jaxfl.models._layers import CONV_IMPLS as CONV_IMPLS
from jaxfl.models._layers import Conv as Conv
from jaxfl.models._layers import batched_clients as batched_clients
from jaxfl.models._layers import conv2d as conv2d
from jaxfl.models._layers import max_pool as max_pool
from jaxfl.models._model import Model as Model
from jaxfl.models._model import from_linen as from_linen
from jaxfl.models._model import from_nnx as from_nnx
from jaxfl.models._zoo import CNN as CNN
from jaxfl.models._zoo import MLP as MLP
from jaxfl.models._zoo import MODELS as MODELS
from jaxfl.models._zoo import ResNet as ResNet
from jaxfl.models._zoo import SmallCNN as SmallCNN
from jaxfl.models._zoo import cnn as cnn
from jaxfl.models._zoo import femnist_cnn as femnist_cnn
from jaxfl.models._zoo import get_model as get_model
from jaxfl.models._zoo import mlp as mlp
from jaxfl.models._zoo import resnet20 as resnet20
from jaxfl.models._zoo import small_cnn as small_cnn

__all__ = ["CNN", "CONV_IMPLS", "MLP", "MODELS", "BatchStatNorm", "BertClassifier", "BertConfig",
           "BertEncoder", "Conv", "FactorisedConv", "FactorisedDense", "Model", "PrismCNN",
           "PrismResNet", "ResNet", "SmallCNN", "Tokens", "batched_clients", "bert_model", "cnn",
           "component_norms", "conv2d", "eligible_conv", "factor_layers", "factorise_kernel",
           "factorise_params", "femnist_cnn", "from_linen", "from_nnx", "gather_components",
           "get_model", "load_bert", "load_bert_config", "load_bert_params", "load_tokenizer",
           "max_pool", "mean_pool", "merge_factors", "merge_params", "minilm_checkpoint_dir", "mlp",
           "prism_cnn", "prism_resnet18", "refactorise", "resnet20", "scatter_components",
           "small_cnn", "split_inputs", "tokenize"]
