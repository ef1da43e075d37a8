"""The papers' experiments (bncore.demos.mnist for now)."""
from .mnist import main

__all__ = ["main"]
