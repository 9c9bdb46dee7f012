"""The response cache: exact-match answers in front of the router, for both edges.

`cache.py` decides (policies per model, lookup, single flight, what may be
stored, replay); `key.py` builds the key from the whole decoded request;
`entry.py` encodes a stored answer; `backends.py` keeps entries in this
process (an LRU bounded in bytes) or in the shared Redis; `directives.py`
reads what a caller asks for one call (gRPC metadata, HTTP headers). The
edges (server/grpc_edge/servicer.py, server/http_edge/generation.py) open a
CachedCall before admission and take their events from it.
"""

from server.cache.cache import (
    BYPASS,
    HIT,
    MISS,
    REFRESH,
    CachedCall,
    CachePolicy,
    ResponseCache,
)
from server.cache.directives import CACHE_HEADER, CACHE_TTL_HEADER, CacheDirectives
from server.cache.directives import from_headers as directives_from_headers
from server.cache.directives import from_metadata as directives_from_metadata
from server.cache.entry import CacheEntry
from server.cache.key import EXCLUDED, cache_key

__all__ = [
    "BYPASS",
    "CACHE_HEADER",
    "CACHE_TTL_HEADER",
    "EXCLUDED",
    "HIT",
    "MISS",
    "REFRESH",
    "CacheDirectives",
    "CacheEntry",
    "CachePolicy",
    "CachedCall",
    "ResponseCache",
    "cache_key",
    "directives_from_headers",
    "directives_from_metadata",
]
