"""The gRPC edge: GenerationService on the gateway's core.

servicer.py serves the RPCs and is the gRPC error boundary; decoding.py
turns protobuf requests into the internal request, encoding.py internal
events and responses into protobuf; coalescing.py merges stream deltas that
wait while the caller is slow. The interceptors (auth, rate limit, tracing)
are in interceptors/; the HTTP edge is beside this one, in server/http_edge/.
"""
