"""Routing and resilience: from a requested model to the deployments that serve it.

router.py runs the calls; route.py says what a route is; retry.py,
breaker.py, balancer.py, context_window.py and smart.py each hold one
policy. Callers import from here.
"""

from server.routing.attempts import Attempt, RoutedCall
from server.routing.breaker import BreakerState, CircuitBreaker
from server.routing.route import Deployment, Route
from server.routing.router import Router, build_providers

__all__ = [
    "Attempt",
    "BreakerState",
    "CircuitBreaker",
    "Deployment",
    "Route",
    "RoutedCall",
    "Router",
    "build_providers",
]
