"""GuardedRouter: the guardrail stage between both edges and the router.

Both edges run generations with `router.stream(request, route)` (and count
tokens with `router.count_tokens`); the gateway hands them this wrapper
instead of the Router when guardrails are configured (server/app.py), so the
stage is written once, in the core. The input stage reads the request before
any upstream call: `block` refuses it (GUARDRAIL_BLOCKED, INVALID_ARGUMENT,
naming entity types and places), `mask` and `redact` rewrite it, in the
gateway's request and, for a pass-through request, in the client's document
and body, which is re-serialized (compact JSON): a relayed body is then no
longer byte for byte the client's (thinking blocks and signatures are
untouched strings within it). The output stage is output.py. Everything
else is the wrapped Router's: its catalog, breakers and observers.

A call whose model and key resolve to no policy goes straight to the Router.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from server.config import GuardrailsConfig
from server.errors import FieldViolation
from server.events import StreamEvent
from server.guardrails.errors import (
    GuardrailBlockedError,
    GuardrailScanBudgetError,
    GuardrailUnavailableError,
)
from server.guardrails.output import OutputGuard, needs_output_stage
from server.guardrails.placeholders import Pseudonyms, Rewriter
from server.guardrails.policy import BLOCK, DETECT, MASK, REDACT, PiiPolicy, Policies
from server.guardrails.request_text import (
    document_texts,
    request_texts,
    rewrite_document,
    rewrite_request,
)
from server.guardrails.scanner import BUDGET, Analyze, Finding, Scanner
from server.identity import current_identity
from server.providers.base import Provider
from server.routing import Route, Router
from server.routing.breaker import BreakerState
from server.schema import GenerationRequest, ModelInfo, TokenCount, TokenCountRequest
from server.telemetry.audit import GUARDRAIL_BLOCKED, GUARDRAIL_MASKED, audit_event

log = logging.getLogger(__name__)

# (stage, action, counts by entity type, seconds analysing, failure or None)
Reporter = Callable[[str, str, dict[str, int], float, str | None], None]


class GuardedRouter(Router):
    """The Router behind a guardrail stage (see the module's docstring).

    A Router by type, so both edges take it as they are; it does not run
    Router.__init__: every attribute it does not define is the wrapped
    router's (`observers`, ...), read through __getattr__.
    """

    def __init__(self, inner: Router, config: GuardrailsConfig, analyze: Analyze) -> None:
        self._inner = inner
        self._guard_config = config
        self.policies = Policies(config)
        self.scanner = Scanner(
            analyze,
            workers=config.workers,
            timeout_s=config.timeout_s,
            max_chars=config.max_scan_chars,
            cache_entries=config.cache_entries,
        )
        # Called with each guarded stage's findings (metrics).
        self.reporters: list[Reporter] = []

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)

    @property
    def inner(self) -> Router:
        return self._inner

    # -- what the Router answers itself ------------------------------------------

    @property
    def providers(self) -> Sequence[Provider]:
        return self._inner.providers

    def resolve(self, model: str) -> Route | None:
        return self._inner.resolve(model)

    def models(self, provider: str = "") -> list[ModelInfo]:
        return self._inner.models(provider)

    def breaker_state(self, deployment: str) -> BreakerState:
        return self._inner.breaker_state(deployment)

    async def aclose(self) -> None:
        self.scanner.shutdown()
        await self._inner.aclose()

    # -- the guarded calls ----------------------------------------------------------

    def _policy(self, requested: str, route: Route) -> PiiPolicy | None:
        identity = current_identity()
        return self.policies.resolve(
            requested, route.model.id, identity.key_id if identity is not None else ""
        )

    def stream(self, request: GenerationRequest, route: Route) -> AsyncIterator[StreamEvent]:
        policy = self._policy(request.model, route)
        if policy is None:
            return self._inner.stream(request, route)
        return self._guarded(request, route, policy)

    async def count_tokens(self, request: TokenCountRequest, route: Route) -> TokenCount:
        """Counts what the model would be sent: the input stage applies (the count
        goes to the provider, with the prompt)."""
        policy = self._policy(request.model, route)
        if policy is not None and policy.on_input:
            await self._input(request, policy, Pseudonyms(), "")
        return await self._inner.count_tokens(request, route)

    async def _guarded(
        self, request: GenerationRequest, route: Route, policy: PiiPolicy
    ) -> AsyncIterator[StreamEvent]:
        pseudonyms = Pseudonyms()
        if policy.on_input:
            await self._input(request, policy, pseudonyms, request.request_id)
        events = self._inner.stream(request, route)
        answer = events
        try:
            if not needs_output_stage(policy, pseudonyms):
                async for event in events:
                    yield event
                return
            guard = OutputGuard(
                policy,
                self.scanner,
                pseudonyms,
                window=self._guard_config.stream_window_chars,
                incremental=request.incremental,
                report=lambda stage, counts, seconds, failure, places: self._report(
                    stage, policy, counts, seconds, failure, places, request.request_id
                ),
            )
            answer = guard.events(events)
            async for event in answer:
                yield event
        finally:
            # Closing runs the Router's own `finally`: the upstream response closes.
            if answer is not events:
                await _close(answer)
            await _close(events)

    async def _input(
        self,
        request: GenerationRequest | TokenCountRequest,
        policy: PiiPolicy,
        pseudonyms: Pseudonyms,
        request_id: str,
    ) -> None:
        rewrites = policy.action in (MASK, REDACT)
        slots = list(request_texts(request))  # type: ignore[arg-type]
        document = request.passthrough
        doc_slots = list(document_texts(document)) if rewrites and document is not None else []
        texts = [text for _, text in slots] + [text for _, text in doc_slots]
        if not texts:
            return
        result = await self.scanner.scan(texts, policy.entities, policy.score_threshold)
        found = result.findings
        by_path = {path: f for (path, _), f in zip(slots, found, strict=False) if f}
        doc_by_path = {
            path: f for (path, _), f in zip(doc_slots, found[len(slots) :], strict=True) if f
        }
        counts: dict[str, int] = {}
        for findings in by_path.values():
            for f in findings:
                counts[f.entity_type] = counts.get(f.entity_type, 0) + 1
        if result.failure is not None:
            missed = [slots[i][0] for i in result.unanalysed if i < len(slots)]
            if policy.fails_closed:
                self._report("input", policy, {}, result.seconds, result.failure, [], request_id)
                if result.failure == BUDGET:
                    raise GuardrailScanBudgetError(
                        [
                            FieldViolation(p, "not checked: over the guardrail's scan budget")
                            for p in missed or ["messages"]
                        ],
                        f"the request holds more new text than the PII guardrail checks"
                        f" per call ({self.scanner.max_chars} characters)",
                    )
                raise GuardrailUnavailableError(
                    f"the PII guardrail could not check the request ({result.failure}); retry"
                )
            log.warning(
                "guardrail: %d text(s) of request %s not checked (%s); on_error: allow",
                len(result.unanalysed),
                request_id,
                result.failure,
            )
        places = list(by_path)
        self._report("input", policy, counts, result.seconds, result.failure, places, request_id)
        if not by_path and not doc_by_path:
            return
        if policy.action == BLOCK:
            raise GuardrailBlockedError(
                [FieldViolation(path, f"contains {_kinds(f)}") for path, f in by_path.items()]
            )
        if not rewrites:
            return
        rewriter = Rewriter(policy.action, pseudonyms)
        rewrite_request(request, _replacer(rewriter, by_path))  # type: ignore[arg-type]
        if document is not None and doc_by_path:
            request.passthrough = rewrite_document(document, _replacer(rewriter, doc_by_path))

    def _report(
        self,
        stage: str,
        policy: PiiPolicy,
        counts: dict[str, int],
        seconds: float,
        failure: str | None,
        places: list[str],
        request_id: str,
    ) -> None:
        """Metrics, the log line and the audit event of one stage: types, counts and
        places, never values."""
        for reporter in self.reporters:
            reporter(stage, policy.action, counts, seconds, failure)
        if not counts:
            return
        listed = [f"{kind}={n}" for kind, n in sorted(counts.items())]
        identity = current_identity()
        key_id = identity.key_id if identity is not None else ""
        log.info(
            "guardrail %s on %s of request %s: %s",
            policy.action,
            stage,
            request_id,
            ", ".join(listed),
        )
        if policy.action == DETECT:
            return
        audit_event(
            GUARDRAIL_BLOCKED if policy.action == BLOCK else GUARDRAIL_MASKED,
            key_id=key_id,
            request_id=request_id,
            stage=stage,
            action=policy.action,
            entities=listed,
            findings=sum(counts.values()),
            fields=places[:50],
        )


async def _close(events: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def _kinds(findings: tuple[Finding, ...]) -> str:
    return ", ".join(sorted({f.entity_type for f in findings}))


def _replacer(
    rewriter: Rewriter, by_path: dict[str, tuple[Finding, ...]]
) -> Callable[[str, str], str]:
    def replace(path: str, text: str) -> str:
        findings = by_path.get(path)
        return rewriter.rewrite(text, findings) if findings else text

    return replace
