"""Which guardrail applies to a call: the `guardrails` section resolved for its
model and its API key.

`guardrails.pii` is every call's default; an entry of `guardrails.models`
named after the model as asked for (an alias, a route) or as resolved
overrides it field by field, and an entry of `guardrails.keys` for the
caller's key overrides both. Fields still unset take the defaults below.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from server.config import ConfigError, GuardrailsConfig, PiiGuardConfig

# Presidio's pattern recognizers with checksums, and ours for secrets
# (recognizers.py): what `entities` may name without an NER model.
PATTERN_ENTITIES = (
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "IP_ADDRESS",
)
SECRET_ENTITIES = (
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "LLMGW_API_KEY",
    "JWT",
    "PEM_PRIVATE_KEY",
    "AWS_ACCESS_KEY",
)
DEFAULT_ENTITIES = PATTERN_ENTITIES + SECRET_ENTITIES
# What a spaCy NER model adds when `guardrails.ner_model` names one.
NER_ENTITIES = ("PERSON", "LOCATION", "NRP", "DATE_TIME")

DETECT = "detect"
MASK = "mask"
REDACT = "redact"
BLOCK = "block"


@dataclass(frozen=True, slots=True)
class PiiPolicy:
    """The PII guardrail of one call, every field resolved."""

    action: str  # detect | mask | redact | block
    entities: frozenset[str]
    score_threshold: float
    scope: str  # input | output | both
    on_error: str  # block | allow
    restore: bool

    @property
    def on_input(self) -> bool:
        return self.scope in ("input", "both")

    @property
    def on_output(self) -> bool:
        return self.scope in ("output", "both")

    @property
    def fails_closed(self) -> bool:
        return self.on_error == "block"


def _merged(layers: Iterable[PiiGuardConfig]) -> PiiPolicy | None:
    merged = PiiGuardConfig()
    for layer in layers:
        merged = merged.model_copy(update=layer.model_dump(exclude_none=True))
    if merged.action in (None, "off"):
        return None
    return PiiPolicy(
        action=merged.action,
        entities=frozenset(DEFAULT_ENTITIES if merged.entities is None else merged.entities),
        score_threshold=0.5 if merged.score_threshold is None else merged.score_threshold,
        scope=merged.scope or "both",
        on_error=merged.on_error or "block",
        restore=bool(merged.restore),
    )


class Policies:
    """Resolves the PII policy of each call (None: not guarded)."""

    def __init__(self, config: GuardrailsConfig) -> None:
        self._config = config
        known = set(DEFAULT_ENTITIES) | (set(NER_ENTITIES) if config.ner_model else set())
        problems = []
        for where, section in self._sections():
            for i, name in enumerate(section.entities or ()):
                if name not in known:
                    problems.append(
                        f"  {where}.entities[{i}]: unknown entity type {name!r} (known:"
                        f" {', '.join(sorted(known))}; PERSON and LOCATION need ner_model)"
                    )
        if problems:
            raise ConfigError("invalid configuration:\n" + "\n".join(problems))
        self._cache: dict[tuple[str, str, str], PiiPolicy | None] = {}

    def _sections(self) -> Iterable[tuple[str, PiiGuardConfig]]:
        yield "guardrails.pii", self._config.pii
        for name, scope in self._config.models.items():
            yield f"guardrails.models.{name}.pii", scope.pii
        for name, scope in self._config.keys.items():
            yield f"guardrails.keys.{name}.pii", scope.pii

    def entities(self) -> frozenset[str]:
        """Every entity type some policy may ask for (the recognizers to load)."""
        names: set[str] = set()
        for _, section in self._sections():
            names.update(section.entities or ())
        if any(section.entities is None for _, section in self._sections()):
            names.update(DEFAULT_ENTITIES)
        return frozenset(names)

    def resolve(self, requested: str, resolved: str, key_id: str) -> PiiPolicy | None:
        """The policy for a model (as asked for and as resolved) and a key id."""
        cache_key = (requested, resolved, key_id)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        config = self._config
        layers = [config.pii]
        model = config.models.get(requested) or config.models.get(resolved)
        if model is not None:
            layers.append(model.pii)
        key = config.keys.get(key_id) if key_id else None
        if key is not None:
            layers.append(key.pii)
        policy = _merged(layers)
        if len(self._cache) < 4096:  # caller-chosen model names: bounded
            self._cache[cache_key] = policy
        return policy
