"""Guardrails: PII and secrets in prompts and answers, detected, masked, redacted
or blocked in the core, for both edges (issue 22).

    edges ──► GuardedRouter (input stage) ──► Router ──► providers
          ◄── GuardedRouter (output stage) ◄──

policy.py resolves each call's policy from the `guardrails` section;
recognizers.py builds Presidio (the `pii` extra) so that nothing is
downloaded; scanner.py runs it off the event loop with a time limit, a scan
budget and a per-block cache; request_text.py finds and replaces a request's
text; placeholders.py numbers the masks; output.py guards the answer;
guarded_router.py puts them between the edges and the Router.
"""

from __future__ import annotations

from server.config import GuardrailsConfig
from server.guardrails.errors import (
    GuardrailBlockedError,
    GuardrailScanBudgetError,
    GuardrailUnavailableError,
)
from server.guardrails.guarded_router import GuardedRouter
from server.guardrails.scanner import Analyze, Finding
from server.routing import Router

__all__ = [
    "Analyze",
    "Finding",
    "GuardedRouter",
    "GuardrailBlockedError",
    "GuardrailScanBudgetError",
    "GuardrailUnavailableError",
    "guarded",
]


def guarded(router: Router, config: GuardrailsConfig, analyze: Analyze | None = None) -> Router:
    """`router` behind the configured guardrails; `router` itself when none is configured
    (so calls pay nothing). Raises ConfigError when they are configured and the
    `pii` extra is missing (naming `pip install llm-gateway[pii]`)."""
    if not config.used:
        return router
    if analyze is None:
        from server.guardrails.policy import Policies
        from server.guardrails.recognizers import presidio_analyzer

        analyze = presidio_analyzer(config, Policies(config).entities())
    return GuardedRouter(router, config, analyze)
