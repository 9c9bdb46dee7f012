"""gRPC server interceptors, one concern per module: authentication, rate limiting, tracing."""
