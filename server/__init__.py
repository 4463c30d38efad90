"""textserve: a multi-model CPU inference server for TensorFlow text classifiers."""

__version__ = "0.1.0"
