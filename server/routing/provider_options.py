"""`provider_options` of one call, resolved for each deployment it may reach.

Two forms. Flat, `{"betas": [...]}`: options for one provider kind. Per
provider, `{"anthropic": {"betas": [...]}, "openai": {"reasoning_effort":
"low"}}`: a section per provider kind (or configured provider instance, whose
section then replaces its kind's), each reaching only its own deployments, so
that a fallback to another provider never receives options it cannot read.
The form is the per-provider one as soon as one top-level key names a provider
kind or instance (no provider takes an option of that name); every key must
then name one, and every section must be an object.

A flat form reaches the deployments of the route's first kind (the provider
the caller wrote it for) and no others: on a route from Claude to GPT, flat
`betas` go to Claude and never to GPT.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from server.errors import FieldViolation, InvalidArgumentError
from server.providers.base import Provider

_PREFIX = "provider_options."


class ProviderOptions:
    """One call's options, parsed once; `of(provider)` gives a deployment's."""

    __slots__ = ("_flat", "_kind", "_sections")

    def __init__(
        self,
        options: Mapping[str, Any],
        first: Provider,
        providers: Collection[str],
    ) -> None:
        """`providers`: every provider kind and instance name the gateway knows.

        Raises InvalidArgumentError for a per-provider form that is not well formed.
        """
        self._kind = first.kind
        self._flat: dict[str, Any] = dict(options)
        self._sections: dict[str, dict[str, Any]] | None = None
        if not any(key in providers for key in options):
            return
        violations = [
            FieldViolation(
                f"{_PREFIX}{key}",
                "options keyed by provider take a provider kind or instance name"
                " at the top level (or give every option flat, for one provider)",
            )
            for key in options
            if key not in providers
        ]
        violations += [
            FieldViolation(f"{_PREFIX}{key}", "must be an object: the options for that provider")
            for key, value in options.items()
            if key in providers and not isinstance(value, dict)
        ]
        if violations:
            raise InvalidArgumentError(violations)
        self._flat = {}
        self._sections = {key: dict(value) for key, value in options.items()}

    @property
    def per_provider(self) -> bool:
        return self._sections is not None

    def section(self, provider: Provider) -> str | None:
        """The key of the section `provider` takes its options from, if any."""
        sections = self._sections
        if sections is None:
            return None
        if provider.name in sections:
            return provider.name
        return provider.kind if provider.kind in sections else None

    def of(self, provider: Provider) -> dict[str, Any]:
        """The options that go to a deployment of `provider`."""
        if self._sections is None:
            return self._flat if provider.kind == self._kind else {}
        key = self.section(provider)
        return {} if key is None else self._sections[key]

    def located(self, error: InvalidArgumentError, provider: Provider) -> InvalidArgumentError:
        """`error` (a provider's refusal) with its option paths inside `provider`'s section."""
        key = self.section(provider)
        if key is None:
            return error
        violations: Sequence[FieldViolation] = [
            FieldViolation(f"{_PREFIX}{key}.{v.field[len(_PREFIX) :]}", v.description)
            if v.field.startswith(_PREFIX)
            else v
            for v in error.violations
        ]
        return InvalidArgumentError(violations)
