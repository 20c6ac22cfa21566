"""The simulated world on loopback: a proxy judge and a fleet of proxies (see world.py).

Imported by nothing but `engine.run demo`, the tests and the benchmarks.
"""

from sim.fleet import Behaviour, ProxyProtocol, ProxyTruth, load_truth
from sim.world import SimWorld, SimWorldError, WorldConfig

__all__ = [
    "Behaviour",
    "ProxyProtocol",
    "ProxyTruth",
    "SimWorld",
    "SimWorldError",
    "WorldConfig",
    "load_truth",
]
