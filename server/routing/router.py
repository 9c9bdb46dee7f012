"""The router: from a requested model to the deployments that serve it, and back.

It owns the model catalog (every provider's models and aliases, plus the
configured routes and the smart alias), and runs each generation through
the resilience policy: deployments in priority order, load-balanced within
a priority (balancer.py), each behind a circuit breaker (breaker.py) and
the rate limits its provider gives us (deployment_limits.py), retried with
backoff on failures a retry may cure and abandoned for the next deployment
when it cannot (retry.py). Every wait stays within the
caller's deadline, and every attempt gets only what is left of it; an
attempt that another deployment may follow leaves that one a share of it
(attempt_timeouts.py).

Before the first attempt, every deployment the call may reach is asked
whether it can take the request (its context window, its parameters and
options: context_window.py, Provider.refusal, provider_options.py); those
that cannot are skipped, so a fallback that could never serve the call does
not turn the primary's outage into the caller's INVALID_ARGUMENT.

The streaming rule: nothing is retried once content has reached the
caller. Events before the first content-bearing one (message start, empty
block starts) are held back until it arrives, so a failure before it is
invisible to the caller; after it, a failure ends the stream with its
status. Generate folds this same stream, so it gets the same retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence

from pydantic import ValidationError

from server.config import ConfigError, GatewayConfig, RoutingConfig
from server.costs import compute_cost
from server.errors import (
    CircuitOpenError,
    DeadlineExceededError,
    DeploymentRateLimitedError,
    GatewayError,
    InvalidArgumentError,
)
from server.events import ContentBlockStart, MessageDelta, MessageStart, RawChunk, StreamEvent
from server.providers.base import Provider
from server.providers.registry import UnknownProviderKindError, available_kinds, provider_class
from server.routing import balancer, smart
from server.routing.attempt_timeouts import (
    AttemptTimeoutError,
    UpstreamWatch,
    content_bound,
    deployment_budget_end,
)
from server.routing.attempts import (
    CANCELLED,
    OK,
    SKIPPED_CIRCUIT_OPEN,
    SKIPPED_INVALID_PARAMETERS,
    SKIPPED_RATE_LIMITED,
    Attempt,
    RoutedCall,
)
from server.routing.breaker import BreakerState, CircuitBreaker, Clock
from server.routing.context_window import estimated_input_tokens, fitting
from server.routing.deployment_limits import RateLimits, Refusal, limiters, model_limits
from server.routing.provider_options import ProviderOptions
from server.routing.retry import Backoff, Remedy, counts_against_deployment, meaningfulness
from server.routing.retry import remedy_for as _remedy_for
from server.routing.route import Deployment, Route
from server.schema import (
    Capabilities,
    GenerationRequest,
    ModelInfo,
    Pricing,
    RoutingDecision,
    TextBlock,
    ThinkingBlock,
    TokenCount,
    TokenCountRequest,
    dearest_pricing,
)

log = logging.getLogger(__name__)

CallObserver = Callable[[RoutedCall], None]


def build_providers(config: GatewayConfig) -> list[Provider]:
    """Instantiates the configured providers; errors name the bad key."""
    providers: list[Provider] = []
    for name, section in config.providers.items():
        try:
            cls = provider_class(section.type)
        except UnknownProviderKindError as err:
            raise ConfigError(f"invalid configuration:\n  providers.{name}.type: {err}") from None
        try:
            providers.append(cls.from_settings(name, section.settings()))
        except ValidationError as err:
            problems = "\n".join(
                f"  providers.{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                for e in err.errors()
            )
            raise ConfigError(f"invalid configuration:\n{problems}") from None
    return providers


def relaying(route: Route, request: GenerationRequest) -> Sequence[Deployment]:
    """The deployments that can serve a pass-through request that translation would
    lose parts of: those that relay its protocol. Raises InvalidArgumentError naming
    what would be lost when there is none."""
    passthrough = request.passthrough
    if passthrough is None or not passthrough.untranslatable:
        return route.deployments
    relays = [d for d in route.deployments if passthrough.protocol in d.provider.relays]
    if not relays:
        lost = "; ".join(f"{v.field}: {v.description}" for v in passthrough.untranslatable)
        raise InvalidArgumentError(
            passthrough.untranslatable,
            f"model {route.model.id!r} is served by translation to another API,"
            f" which cannot carry: {lost}",
        )
    return relays


def _all_relay(deployments: Sequence[Deployment], request: GenerationRequest) -> bool:
    passthrough = request.passthrough
    return passthrough is not None and all(
        passthrough.protocol in d.provider.relays for d in deployments
    )


def _held_back(event: StreamEvent) -> bool:
    """Whether an event carries nothing yet, so it may wait for the first content."""
    if isinstance(event, MessageStart | RawChunk):
        return True
    if isinstance(event, ContentBlockStart):
        block = event.block
        if isinstance(block, TextBlock):
            return not block.text
        if isinstance(block, ThinkingBlock):
            return not (block.text or block.signature or block.redacted_data)
    return False


async def _until_content(upstream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    """The events up to and including the first content-bearing one (or to the end)."""
    held: list[StreamEvent] = []
    async for event in upstream:
        held.append(event)
        if not _held_back(event):
            break
    return held


def _timed_out(
    deployment: Deployment, committed: bool, incremental: bool, waited: float | None
) -> AttemptTimeoutError:
    """The failure of an attempt its UpstreamWatch ended."""
    name = deployment.provider.name
    if committed:
        said = f"provider {name} sent nothing for {waited or 0:.1f}s in the middle of the stream"
    elif incremental:
        said = f"provider {name} sent no content within {waited or 0:.1f}s"
    else:
        said = f"provider {name} gave no answer within {waited or 0:.1f}s"
    return AttemptTimeoutError(said, metadata={"provider": name})


async def _close(upstream: AsyncIterator[StreamEvent]) -> None:
    # Closing an async generator runs the provider's `finally`, which closes
    # the upstream response: a cancelled call stops at once.
    aclose = getattr(upstream, "aclose", None)
    if aclose is not None:
        await aclose()


class Router:
    """Resolves models to routes and runs calls on their deployments.

    `clock` (monotonic seconds) drives the circuit breakers and `rng` the
    jitter and load balancing; tests inject both.
    """

    def __init__(
        self,
        providers: Iterable[Provider],
        routing: RoutingConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        model_limits: Mapping[str, RateLimits] | None = None,
    ) -> None:
        self._providers = list(providers)
        # What a per-provider `provider_options` may be keyed by (provider_options.py).
        self._option_keys = frozenset(
            {
                *available_kinds(),
                *(p.kind for p in self._providers),
                *(p.name for p in self._providers),
            }
        )
        self._config = routing or RoutingConfig()
        self._clock = clock
        self._rng = rng or random.Random()
        self._backoff = Backoff(self._config.retry, self._rng)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._in_flight: dict[str, int] = {}
        # Called with each call's record when it ends (tracing, metrics).
        self.observers: list[CallObserver] = []
        self._routes: dict[str, Route] = {}
        for provider in self._providers:
            for model in provider.models():
                for key in (model.id, *model.aliases):
                    existing = self._routes.get(key)
                    if existing is None:
                        self._routes[key] = Route(provider, model)
                    elif key not in self._config.routes:
                        raise ConfigError(
                            f"invalid configuration:\n  providers.{provider.name}: model {key!r}"
                            f" is also served by provider {existing.provider.name!r}"
                            f" (a route in routing.routes may serve it from both)"
                        )
        # (configuration key, deployment, limits) of route deployments with rate limits.
        self._routed_limits: list[tuple[str, str, RateLimits]] = []
        # Configured routes take precedence over the catalog: a route named
        # after a model spreads that model over several deployments.
        self._configured = {alias: self._configured_route(alias) for alias in self._config.routes}
        self._smart = self._smart_route()
        # Only limited deployments have one (deployment_limits.py).
        self._limiters = limiters(model_limits or {}, self._routed_limits)

    @classmethod
    def from_config(cls, config: GatewayConfig, **kwargs: object) -> Router:
        """The router of a configuration: its providers and its routing section."""
        providers = build_providers(config)  # validates the model entries read below
        limits = model_limits(config)
        return cls(providers, config.routing, model_limits=limits, **kwargs)  # type: ignore[arg-type]

    @property
    def providers(self) -> Sequence[Provider]:
        return self._providers

    # -- catalog -----------------------------------------------------------------

    def _find(self, provider_name: str, model_id: str, where: str) -> Deployment:
        provider = next((p for p in self._providers if p.name == provider_name), None)
        if provider is None:
            raise ConfigError(
                f"invalid configuration:\n  {where}.provider: no provider named {provider_name!r}"
            )
        model = next(
            (m for m in provider.models() if model_id in (m.id, *m.aliases)), None
        ) or provider.unlisted_model(model_id)
        if model is None:
            raise ConfigError(
                f"invalid configuration:\n  {where}.model: provider {provider_name!r}"
                f" does not serve model {model_id!r}"
            )
        return Deployment(provider, model)

    def _configured_route(self, alias: str) -> Route:
        deployments: list[Deployment] = []
        first_of_model: dict[str, int] = {}
        for i, section in enumerate(self._config.routes[alias]):
            found = self._find(section.provider, section.model, f"routing.routes.{alias}[{i}]")
            model = found.model
            limits = {
                k: v
                for k, v in (
                    ("context_window", section.context_window),
                    ("max_output_tokens", section.max_output_tokens),
                )
                if v is not None
            }
            if limits:
                model = dataclasses.replace(model, **limits)  # type: ignore[arg-type]
            priority = section.priority
            if priority is None:
                priority = first_of_model.setdefault(model.id, i)
            deployment = Deployment(found.provider, model, section.weight, priority)
            rate_limits = RateLimits(section.requests_per_minute, section.tokens_per_minute)
            if rate_limits:
                where = f"routing.routes.{alias}[{i}]"
                self._routed_limits.append((where, deployment.name, rate_limits))
            deployments.append(deployment)
        return self._combined(alias, deployments)

    @staticmethod
    def _combined(
        alias: str,
        deployments: Sequence[Deployment],
        *,
        display_name: str = "",
        pricing: Pricing | None = None,
    ) -> Route:
        """A route over deployments, with the most generous limits among them;
        its provider is theirs when they share one, else none ("")."""
        models = [d.model for d in deployments]
        first = models[0]
        providers = {d.provider.name for d in deployments}
        info = ModelInfo(
            id=alias,
            provider=providers.pop() if len(providers) == 1 else "",
            display_name=display_name or alias,
            context_window=max(m.context_window for m in models),
            max_output_tokens=max(m.max_output_tokens for m in models),
            default_max_tokens=first.default_max_tokens,
            pricing=first.pricing if pricing is None else pricing,
            capabilities=Capabilities(
                streaming=True,
                tools=any(m.capabilities.tools for m in models),
                images=any(m.capabilities.images for m in models),
                thinking=any(m.capabilities.thinking for m in models),
            ),
        )
        ordered = tuple(sorted(deployments, key=lambda d: d.priority))
        return Route(ordered[0].provider, info, ordered)

    def _smart_route(self) -> Route | None:
        config = self._config.smart
        if config is None:
            return None
        tiers: dict[str, Route] = {}
        for tier, target in config.tiers.items():
            route = self._resolve_plain(target)
            if route is None:
                raise ConfigError(
                    f"invalid configuration:\n  routing.smart.tiers.{tier}: no model or route"
                    f" named {target!r}"
                )
            tiers[tier] = route
        every = [d for route in tiers.values() for d in route.deployments]
        # Listed as what it is: which model each tier goes to, priced at the
        # dearest (a call is priced at the tier that serves it).
        served = ", ".join(f"{tier} -> {route.model.id}" for tier, route in tiers.items())
        combined = self._combined(
            config.alias,
            every,
            display_name=f"Smart routing ({served})",
            pricing=dearest_pricing(d.model.pricing for d in every),
        )

        def choose(request: GenerationRequest) -> tuple[Route, str, str]:
            tier, reason = smart.choose_tier(request, config, smart.caller_budget_nanos())
            used = smart.configured_tier(tier, config)
            if used != tier:
                reason = f"{reason}; tier {tier} not configured"
            return tiers[used], used, reason

        return dataclasses.replace(combined, choose=choose)

    def _resolve_plain(self, model: str) -> Route | None:
        route = self._configured.get(model) or self._routes.get(model)
        if route is not None:
            return route
        for provider in self._providers:
            info = provider.unlisted_model(model)
            if info is not None:
                return Route(provider, info)
        return None

    def resolve(self, model: str) -> Route | None:
        """The route for a model id, alias, route or the smart alias; None when nobody serves it.

        Configured routes first, then listed ids and aliases; then an unlisted
        id is offered to each provider in configuration order (e.g. `claude-...`
        to Anthropic).
        """
        if self._smart is not None and model == self._smart.model.id:
            return self._smart
        return self._resolve_plain(model)

    def models(self, provider: str = "") -> list[ModelInfo]:
        """Every model served (each once, aliases included), optionally of one provider.

        Routes (and the smart alias) are listed too when no provider is asked for.
        """
        listed = [
            model
            for p in self._providers
            if not provider or p.name == provider
            for model in p.models()
        ]
        if not provider:
            known = {m.id for m in listed}
            extra = [*self._configured.values(), *([self._smart] if self._smart else [])]
            listed += [r.model for r in extra if r.model.id not in known]
        return listed

    # -- resilience state ------------------------------------------------------------

    def breaker_state(self, deployment: str) -> BreakerState:
        """The circuit state of a deployment ("provider/model")."""
        breaker = self._breakers.get(deployment)
        return BreakerState.CLOSED if breaker is None else breaker.state

    def _breaker(self, deployment: Deployment) -> CircuitBreaker | None:
        config = self._config.breaker
        if not config.enabled:
            return None
        breaker = self._breakers.get(deployment.name)
        if breaker is None:
            breaker = self._breakers[deployment.name] = CircuitBreaker(
                deployment.name,
                failure_threshold=config.failure_threshold,
                recovery_s=config.recovery_s,
                half_open_probes=config.half_open_probes,
                clock=self._clock,
            )
        return breaker

    def _plan(self, deployments: Sequence[Deployment]) -> Iterator[Deployment]:
        """Deployments in the order to try them: by priority, balanced within one."""
        if len(deployments) == 1:
            yield deployments[0]
            return
        priorities = sorted({d.priority for d in deployments})
        for priority in priorities:
            group = [d for d in deployments if d.priority == priority]
            yield from balancer.order(group, self._config.balancing, self._in_flight, self._rng)

    def _able(
        self,
        deployments: Sequence[Deployment],
        request: GenerationRequest,
        options: ProviderOptions,
        call: RoutedCall,
        now: float,
    ) -> Sequence[Deployment]:
        """The deployments that can take the request, in order; the others are recorded
        as skipped. Raises the first one's refusal when none can.

        A lone deployment with flat options is not asked: building its call
        refuses the same things, in the same words (Provider.refusal).
        """
        if len(deployments) == 1 and not options.per_provider:
            return deployments
        able: list[Deployment] = []
        first: InvalidArgumentError | None = None
        for deployment in deployments:
            provider = deployment.provider
            probe = dataclasses.replace(
                request, model=deployment.model.id, provider_options=options.of(provider)
            )
            refusal = provider.refusal(probe)
            if refusal is None:
                able.append(deployment)
                continue
            first = first or options.located(refusal, provider)
            call.attempts.append(Attempt(deployment.name, SKIPPED_INVALID_PARAMETERS, 0.0, now))
            log.info(
                "skipping %s, which cannot take the request: %s (request_id=%s)",
                deployment.name,
                refusal.message,
                request.request_id,
            )
        if first is not None and not able:
            first.attempts = call.describe_attempts()
            raise first
        return able

    # -- calls -------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest, route: Route) -> AsyncIterator[StreamEvent]:
        """Runs a generation on the route, with retries and fallbacks, pricing the final usage."""
        call = RoutedCall(request.request_id, request.model)
        try:
            if route.choose is not None:
                route, call.tier, call.tier_reason = route.choose(request)
                log.info(
                    "smart routing: %s -> %s tier (%s), model %s, request_id=%s",
                    call.model,
                    call.tier,
                    call.tier_reason,
                    route.model.id,
                    request.request_id,
                )
            deployments = relaying(route, request)
            if not _all_relay(deployments, request):
                # A relayed request is checked by its upstream, whose exact count
                # and own "prompt is too long" reach the client; the gateway's
                # estimate errs high and would refuse some that fit.
                deployments = fitting(deployments, request)
            loop = asyncio.get_running_loop()
            options = ProviderOptions(
                request.provider_options, route.deployments[0].provider, self._option_keys
            )
            deployments = self._able(deployments, request, options, call, loop.time())
            # The attempts loop is inline, not a nested generator: it runs for
            # every event of every call.
            deadline = request.deadline
            retry = self._config.retry
            failures: list[GatewayError] = []
            refusals: list[Refusal] = []
            tokens: int | None = None  # estimated once, for the first token-limited deployment
            watch = UpstreamWatch(loop)
            idle = retry.stream_idle_timeout_s
            left = list(deployments)  # not yet reached
            for deployment in self._plan(deployments):
                breaker = self._breaker(deployment)
                limiter = self._limiters.get(deployment.name)
                left.remove(deployment)
                further = any(self.breaker_state(d.name) is not BreakerState.OPEN for d in left)
                budget_end = deployment_budget_end(retry, loop.time(), deadline, further)
                for attempt_number in range(1, retry.max_attempts + 1):
                    if attempt_number > 1 and budget_end is not None and loop.time() >= budget_end:
                        break  # the rest of the time is the fallback's
                    if breaker is not None and not breaker.allow():
                        skipped = Attempt(deployment.name, SKIPPED_CIRCUIT_OPEN, 0.0, loop.time())
                        call.attempts.append(skipped)
                        break
                    if limiter is not None:
                        if tokens is None and limiter.counts_tokens:
                            tokens = estimated_input_tokens(request) + request.max_tokens
                        queued = loop.time()
                        until = queued + self._config.deployment_queue_s
                        refusal = await limiter.acquire(
                            tokens or 0, until if deadline is None else min(until, deadline)
                        )
                        if refusal is not None:
                            # Our own limit: says nothing about the deployment's health.
                            if breaker is not None:
                                breaker.release()
                            refusals.append(refusal)
                            call.attempts.append(
                                Attempt(
                                    deployment.name,
                                    SKIPPED_RATE_LIMITED,
                                    loop.time() - queued,
                                    queued,
                                )
                            )
                            break
                    request.model = deployment.model.id
                    request.provider_options = options.of(deployment.provider)
                    request.deadline = deadline
                    if retry.attempt_timeout_s is not None:
                        ends = loop.time() + retry.attempt_timeout_s
                        request.deadline = ends if deadline is None else min(deadline, ends)
                    attempt = Attempt(deployment.name, OK)
                    call.attempts.append(attempt)
                    name = deployment.name
                    self._in_flight[name] = self._in_flight.get(name, 0) + 1
                    started = attempt.started_at = loop.time()
                    content_by = content_bound(retry, request.incremental, started, budget_end)
                    upstream = deployment.provider.stream(request)
                    try:
                        if content_by is not None:
                            watch.expect(content_by)
                        held = await _until_content(upstream)
                        watch.got()
                        # Content is about to reach the caller: from here on, no retry.
                        attempt.committed = True
                        pricing = deployment.model.pricing
                        for event in held:
                            if isinstance(event, MessageDelta) and event.usage is not None:
                                event.cost = compute_cost(event.usage, pricing)
                            elif isinstance(event, MessageStart):
                                event.pricing = pricing
                                if call.tier:
                                    event.routing = RoutingDecision(
                                        call.model, call.tier, call.tier_reason
                                    )
                            yield event
                        while True:
                            if idle is not None:
                                watch.expect(loop.time() + idle)
                            try:
                                event = await upstream.__anext__()
                            except StopAsyncIteration:
                                break
                            watch.got()
                            if isinstance(event, MessageDelta) and event.usage is not None:
                                event.cost = compute_cost(event.usage, pricing)
                            yield event
                        if breaker is not None:
                            breaker.record_success()
                        return
                    except GatewayError as err:
                        error = err
                    except asyncio.CancelledError:
                        if not watch.timed_out():
                            attempt.outcome = CANCELLED
                            if breaker is not None:
                                breaker.release()
                            raise
                        waited = idle if attempt.committed else (content_by or started) - started
                        error = _timed_out(
                            deployment, attempt.committed, request.incremental, waited
                        )
                    except BaseException as err:
                        # The caller went away (cancel, deadline, closed stream) or a
                        # provider has a bug: says nothing about the deployment's health.
                        attempt.outcome = (
                            CANCELLED if not isinstance(err, Exception) else "INTERNAL"
                        )
                        if breaker is not None:
                            breaker.release()
                        raise
                    finally:
                        watch.close()
                        attempt.duration_s = loop.time() - started
                        self._in_flight[name] -= 1
                        await _close(upstream)

                    failures.append(error)
                    delay = self._after_failure(
                        call,
                        failures,
                        attempt_number,
                        breaker,
                        deadline if budget_end is None else budget_end,
                        request.request_id,
                        deadline_passed=deadline is not None and loop.time() >= deadline,
                    )
                    if delay is None:
                        break
                    await asyncio.sleep(delay)
                if deadline is not None and loop.time() >= deadline:
                    break
            raise self._give_up(call, failures, None, refusals)
        finally:
            for observe in self.observers:
                observe(call)

    def _after_failure(
        self,
        call: RoutedCall,
        failures: list[GatewayError],
        attempt_number: int,
        breaker: CircuitBreaker | None,
        until: float | None,
        request_id: str,
        *,
        deadline_passed: bool,
    ) -> float | None:
        """Records a failed attempt and decides what follows it.

        Returns how long to wait before retrying the same deployment, or None
        to go on to the next one; raises the final error when nothing may follow.
        No retry starts at or after `until` (the caller's deadline, or where the
        deployment's share of it ends).
        """
        error, attempt = failures[-1], call.attempts[-1]
        attempt.outcome = error.reason
        if breaker is not None:
            if counts_against_deployment(error):
                breaker.record_failure()
            else:
                breaker.release()
        now = asyncio.get_running_loop().time()
        remedy = _remedy_for(error, deadline_passed=deadline_passed)
        if attempt.committed or remedy is Remedy.NONE:
            raise self._give_up(call, failures, error)
        delay = None
        if remedy is Remedy.RETRY and attempt_number < self._config.retry.max_attempts:
            delay = self._backoff.delay(attempt_number, error.retry_after)
            if delay is not None and until is not None and now + delay >= until:
                delay = None  # no sleeping past the caller's deadline (or the share of it)
        log.warning(
            "attempt %d on %s failed: %s (request_id=%s); %s",
            attempt_number,
            attempt.deployment,
            error.reason,
            request_id,
            "trying the next deployment" if delay is None else f"retrying in {delay:.3f}s",
        )
        return delay

    def _give_up(
        self,
        call: RoutedCall,
        failures: Sequence[GatewayError],
        last: GatewayError | None,
        refusals: Sequence[Refusal] = (),
    ) -> GatewayError:
        """The error to report when the call cannot succeed, with the attempts in its details.

        A failure no retry could cure (a 400, a spent deadline) is the answer
        itself; otherwise the failure the caller can act on best, so a 429
        with its retry-after is not hidden behind a later generic 503.
        Deployments skipped at their rate limits count as one such failure,
        retryable when the first of them has room again.
        """
        if refusals and last is None:
            waits = [r.retry_after for r in refusals if r.retry_after is not None]
            limited = DeploymentRateLimitedError(
                [r.violation for r in refusals],
                retry_after=min(waits) if waits else None,
                metadata={"model": call.model},
            )
            failures = [*failures, limited]
        if last is not None:
            chosen = last
        elif failures:
            chosen = failures[0]
            for failure in failures[1:]:
                if meaningfulness(failure) >= meaningfulness(chosen):
                    chosen = failure
        elif any(a.outcome == SKIPPED_CIRCUIT_OPEN for a in call.attempts):
            skipped = {a.deployment for a in call.attempts if a.outcome == SKIPPED_CIRCUIT_OPEN}
            chosen = CircuitOpenError(
                f"every deployment of model {call.model!r} is failing; retry later",
                metadata={"model": call.model},
                retry_after=self._next_probe_in(skipped),
            )
        else:
            chosen = DeadlineExceededError("the deadline ran out before an upstream call")
        chosen.attempts = call.describe_attempts()
        return chosen

    async def count_tokens(self, request: TokenCountRequest, route: Route) -> TokenCount:
        """Counts on the first deployment whose circuit is not open, falling back on failures.

        On the smart alias, with the tier the same request would be sent to."""
        if route.choose is not None:
            as_generation = GenerationRequest(
                model=request.model,
                messages=request.messages,
                max_tokens=0,
                request_id="",
                system=request.system,
                tools=request.tools,
            )
            route = route.choose(as_generation)[0]
        failures: list[GatewayError] = []
        for deployment in route.deployments:
            breaker = self._breakers.get(deployment.name)
            if breaker is not None and breaker.state is BreakerState.OPEN:
                continue
            request.model = deployment.model.id
            try:
                return await deployment.provider.count_tokens(request)
            except GatewayError as err:
                if _remedy_for(err, deadline_passed=False) is Remedy.NONE:
                    raise
                failures.append(err)
        if failures:
            raise max(reversed(failures), key=meaningfulness)
        raise CircuitOpenError(
            f"every deployment of model {route.model.id!r} is failing",
            retry_after=self._next_probe_in(d.name for d in route.deployments),
        )

    def _next_probe_in(self, deployments: Iterable[str]) -> float | None:
        """The soonest any of these deployments' open circuits lets a call through."""
        waits = [
            wait
            for name in deployments
            if (breaker := self._breakers.get(name)) is not None
            and (wait := breaker.next_probe_in()) is not None
        ]
        return min(waits, default=None)

    async def aclose(self) -> None:
        for provider in self._providers:
            await provider.aclose()
