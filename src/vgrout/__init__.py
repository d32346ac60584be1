"""vgrout: keep a reward hack out of the deployed model by editing the gradient of an SVD adapter."""

__version__ = "0.1.0"
