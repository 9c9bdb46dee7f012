"""Presidio, built so that nothing is fetched at run time.

The NLP engine is a blank spaCy pipeline (tokens only, no model: Presidio's
default engine downloads `en_core_web_lg` and fails offline), unless
`guardrails.ner_model` names an installed spaCy package, which adds its named
entities. Presidio's pattern recognizers bring their checksums (Luhn for
cards, the IBAN check digits, SSN validity); the e-mail recognizer's
domain check uses tldextract's bundled public-suffix snapshot instead of
downloading the list. The secret recognizers are PatternRecognizers
registered into the same registry, so one analysis finds both.

Only this module imports the `pii` extra; it is imported when guardrails
are configured.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from server.config import ConfigError, GuardrailsConfig
from server.guardrails.scanner import Finding

INSTALL_HINT = "pip install llm-gateway[pii]"

# Secrets, by entity type: (pattern name, regex, score). Each regex also
# matches an unfinished value of useful length, so a stream's hold-back window
# (output.py) keeps back a key whose end has not arrived yet. `(?-i:...)`:
# Presidio matches case-insensitively, these prefixes are case-sensitive.
SECRET_PATTERNS: dict[str, list[tuple[str, str, float]]] = {
    "ANTHROPIC_API_KEY": [
        ("anthropic key", r"(?-i:\bsk-ant-[A-Za-z0-9_\-]{16,})", 0.95),
    ],
    "OPENAI_API_KEY": [
        ("openai key", r"(?-i:\bsk-(?!ant-)(?:[A-Za-z0-9]+-)?[A-Za-z0-9_\-]{20,})", 0.9),
    ],
    "LLMGW_API_KEY": [
        ("llm-gateway key", r"(?-i:\bllmgw_[0-9a-f]{12}_[0-9a-f]{16,})", 0.99),
    ],
    "JWT": [
        (
            "jwt",
            # The signature optional: a payload still arriving is held back.
            r"(?-i:\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}(?:\.[A-Za-z0-9_\-]*)?)",
            0.9,
        ),
    ],
    "PEM_PRIVATE_KEY": [
        (
            "pem private key",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
            r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[A-Za-z0-9+/=\s:,\-]*)",
            0.99,
        ),
    ],
    "AWS_ACCESS_KEY": [
        ("aws access key id", r"(?-i:\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b)", 0.95),
    ],
}

Analyzer = Callable[[str, frozenset[str], float], list[Finding]]


def missing_extra_error(err: ImportError) -> ConfigError:
    return ConfigError(
        "guardrails are configured but their analyzer is not installed"
        f" ({err.name or err}): {INSTALL_HINT}"
    )


def presidio_analyzer(config: GuardrailsConfig, entities: Iterable[str]) -> Analyzer:
    """A thread-safe analyze(text, entities, threshold) over Presidio, for `entities`.

    Raises ConfigError naming `pip install llm-gateway[pii]` when the extra is
    not installed, or naming `guardrails.ner_model` when that model is not.
    """
    try:
        import spacy
        import tldextract
        from presidio_analyzer import AnalyzerEngine, PatternRecognizer, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.pattern import Pattern
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            SpacyRecognizer,
            UsSsnRecognizer,
        )
    except ImportError as err:
        raise missing_extra_error(err) from None

    # Presidio logs every pattern's match time at DEBUG: not for the gateway's log.
    logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)
    wanted = set(entities)
    language = config.language
    # The bundled public-suffix snapshot, never a download.
    offline_suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return bool(offline_suffixes(pattern_text).fqdn)

    class ValidatedPhoneRecognizer(PhoneRecognizer):
        # Presidio gives 0.4, counting on context words that a blank pipeline
        # (no lemmas) cannot match; phonenumbers has validated each number for
        # its region already, so it passes the default threshold (0.5).
        SCORE = 0.6

    registry = RecognizerRegistry(supported_languages=[language])
    builtin: dict[str, Callable[[], Any]] = {
        "CREDIT_CARD": lambda: CreditCardRecognizer(supported_language=language),
        "IBAN_CODE": lambda: IbanRecognizer(supported_language=language),
        "US_SSN": lambda: UsSsnRecognizer(supported_language=language),
        "EMAIL_ADDRESS": lambda: OfflineEmailRecognizer(supported_language=language),
        "PHONE_NUMBER": lambda: ValidatedPhoneRecognizer(
            supported_language=language, supported_regions=tuple(config.phone_regions)
        ),
        "IP_ADDRESS": lambda: IpRecognizer(supported_language=language),
    }
    for entity, make in builtin.items():
        if entity in wanted:
            registry.add_recognizer(make())
    for entity, patterns in SECRET_PATTERNS.items():
        if entity in wanted:
            registry.add_recognizer(
                PatternRecognizer(
                    supported_entity=entity,
                    name=f"{entity.lower()}_recognizer",
                    supported_language=language,
                    patterns=[Pattern(name, regex, score) for name, regex, score in patterns],
                )
            )

    engine = SpacyNlpEngine(
        models=[{"lang_code": language, "model_name": config.ner_model or "blank"}],
        ner_model_configuration=NerModelConfiguration(),
    )
    if config.ner_model:
        if not spacy.util.is_package(config.ner_model):
            raise ConfigError(
                "invalid configuration:\n  guardrails.ner_model: spaCy model"
                f" {config.ner_model!r} is not installed (it is never downloaded at run time)"
            )
        engine.nlp = {language: spacy.load(config.ner_model)}  # type: ignore[assignment]
        registry.add_recognizer(SpacyRecognizer(supported_language=language))
    else:
        engine.nlp = {language: spacy.blank(language)}  # type: ignore[assignment]
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=[language])
    # spaCy's Language object is not documented as thread-safe: one call at a
    # time through it; the pool still keeps the event loop free.
    lock = threading.Lock()

    def analyze(text: str, kinds: frozenset[str], threshold: float) -> list[Finding]:
        with lock:
            results = analyzer.analyze(
                text, language=language, entities=sorted(kinds), score_threshold=threshold
            )
        return [Finding(r.entity_type, r.start, r.end, r.score) for r in results]

    return analyze
