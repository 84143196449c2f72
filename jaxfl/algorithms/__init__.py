"""Ready-made federated algorithms: compositions of client, aggregator and server transforms."""

from jaxfl.algorithms._base import Algorithm as Algorithm
from jaxfl.algorithms._fedopt import ALGORITHMS as ALGORITHMS
from jaxfl.algorithms._fedopt import fedadagrad as fedadagrad
from jaxfl.algorithms._fedopt import fedadam as fedadam
from jaxfl.algorithms._fedopt import fedavg as fedavg
from jaxfl.algorithms._fedopt import fedavgm as fedavgm
from jaxfl.algorithms._fedopt import fedopt as fedopt
from jaxfl.algorithms._fedopt import fedprox as fedprox
from jaxfl.algorithms._fedopt import fedyogi as fedyogi
from jaxfl.algorithms._fedopt import get_algorithm as get_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedopt",
           "fedprox", "fedyogi", "get_algorithm"]
