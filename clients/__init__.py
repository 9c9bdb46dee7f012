"""Client libraries for the gateway.

The Python client and CLI live here; other languages under clients/node/ and so on.
"""
