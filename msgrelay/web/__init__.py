"""The Klein HTTP layer translating requests to relay operations."""
