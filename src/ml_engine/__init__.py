"""ml-engine: Hydra-composed Lightning training and llama.cpp generation sweeps."""

__version__ = "0.1.0"
