"""Outgoing HTTPS pieces shared by the client and the relay (trust roots, the treq client).

Neutral ground: nothing here imports the relay or the client, so `msgrelay.client` can use
it without ever importing server modules.
"""
