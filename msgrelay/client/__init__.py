"""The msgrelay client library and command line (uses only the wire layer)."""
