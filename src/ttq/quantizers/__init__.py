"""The methods: one file per method (or family) holding its config class, its handler and, where the
default does not fit, how a table makes rows of it (:mod:`ttq.registry`).  The math they call is in
:mod:`ttq.methods`, the modules they build in :mod:`ttq.nn`.

Importing this package registers every built-in method, in the paper's row order.
"""

from ttq.quantizers.rtn import RTNConfig
from ttq.quantizers.awq import AWQConfig, AWQSearchConfig
from ttq.quantizers.gptq import GPTQConfig
from ttq.quantizers.awp import AWPConfig
from ttq.quantizers.ttq import TTQConfig
from ttq.quantizers.lowrank import FACTOR_WHICH, LOWRANK_INITS, ONLINE_RULES, OnlineLowRankTTQConfig, TTQLowRankConfig
from ttq.quantizers.prune import PruneConfig
from ttq.quantizers.hqq import HQQConfig
from ttq.quantizers.sde import LWCConfig, SDEConfig

__all__ = [
    "AWPConfig",
    "AWQConfig",
    "AWQSearchConfig",
    "FACTOR_WHICH",
    "GPTQConfig",
    "HQQConfig",
    "LWCConfig",
    "LOWRANK_INITS",
    "ONLINE_RULES",
    "OnlineLowRankTTQConfig",
    "PruneConfig",
    "RTNConfig",
    "SDEConfig",
    "TTQConfig",
    "TTQLowRankConfig",
]
