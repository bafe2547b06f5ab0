"""hidlr: Hessian-informed differential learning rates for any PyTorch optimizer."""

__version__ = "0.1.0"
