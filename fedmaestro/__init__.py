"""fedmaestro: learned low-rank models (Maestro) in federated simulation and centrally."""

__version__ = "0.1.0"
