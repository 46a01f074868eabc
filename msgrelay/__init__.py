"""msgrelay: a federated store-and-forward relay for end-to-end-encrypted messages."""

__version__ = "0.1.0"
