"""Mixture-of-experts models over expert parallelism: the Mixtral reader and forward (mixtral.py), the
EP layer (ep.py), grouped experts (experts.py), routing traces (trace.py) and the studies' algorithms:
placement and load balancing (placement.py), speculative token shuffling (speculative.py), static
capacity vs dynamic gating (gating.py), expert buffering (buffering.py)."""
from .ep import EPMoE, VirtualExperts
from .mixtral import LocalMoE, Mixtral, MixtralConfig, MixtralLayer, MixtralWeights, load_mixtral, random_mixtral
from .placement import Placement

__all__ = ["EPMoE", "VirtualExperts", "LocalMoE", "Mixtral", "MixtralConfig", "MixtralLayer", "MixtralWeights",
           "load_mixtral", "random_mixtral", "Placement"]
