"""Analysis off the event loop, bounded in time and in size, cached per block.

Each call hands the scanner its texts (one per content block, or per string
of a tool's input). A text analysed before, with the same entity types and
threshold, is answered from an LRU keyed by its hash (never its content), so
an agent that resends its whole transcript pays only for its new blocks. The
new texts of a call are analysed together, in one job of a small thread pool,
under the call's time limit; only `max_chars` of new text are analysed per
call. What is not analysed (time-out, analyzer error, over the budget) is
reported as such, and the caller applies its `on_error`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Why texts went unanalysed (ScanResult.failure).
TIMEOUT = "timeout"
ERROR = "error"
BUDGET = "budget"


@dataclass(frozen=True, slots=True)
class Finding:
    """An entity found in a text: its type and where (character offsets), never the value."""

    entity_type: str
    start: int
    end: int
    score: float


@dataclass(slots=True)
class ScanResult:
    """Findings per text, in the order given; None for a text that was not analysed."""

    findings: list[tuple[Finding, ...] | None]
    failure: str | None = None  # TIMEOUT | ERROR | BUDGET, when some text was not analysed
    analysed: int = 0  # texts analysed now
    cached: int = 0  # texts answered from the cache
    analysed_chars: int = 0
    seconds: float = 0.0
    unanalysed: list[int] = field(default_factory=list)  # indexes of texts not analysed


Analyze = Callable[[str, frozenset[str], float], list[Finding]]


class Scanner:
    """Runs an analyzer in a thread pool, with a result cache and per-call limits."""

    def __init__(
        self,
        analyze: Analyze,
        *,
        workers: int = 2,
        timeout_s: float = 1.0,
        max_chars: int = 250_000,
        cache_entries: int = 50_000,
    ) -> None:
        self._analyze = analyze
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="guardrails")
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._capacity = cache_entries
        self._cache: OrderedDict[bytes, tuple[Finding, ...]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(text: str, entities: frozenset[str], threshold: float) -> bytes:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
        digest.update(f"\0{threshold!r}\0{','.join(sorted(entities))}".encode())
        return digest.digest()

    def _cached(self, key: bytes) -> tuple[Finding, ...] | None:
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            return found

    def _store(self, key: bytes, findings: tuple[Finding, ...]) -> None:
        if not self._capacity:
            return
        with self._lock:
            self._cache[key] = findings
            self._cache.move_to_end(key)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)

    def _run(
        self, jobs: list[tuple[bytes, str]], entities: frozenset[str], threshold: float, cache: bool
    ) -> dict[bytes, tuple[Finding, ...]]:
        results: dict[bytes, tuple[Finding, ...]] = {}
        for key, text in jobs:
            found = tuple(self._analyze(text, entities, threshold))
            results[key] = found
            if cache:
                # Stored as each one ends: a call that timed out still leaves
                # its finished blocks for the retry.
                self._store(key, found)
        return results

    async def scan(
        self,
        texts: Sequence[str],
        entities: frozenset[str],
        threshold: float,
        *,
        cache: bool = True,
        timeout_s: float | None = None,
    ) -> ScanResult:
        """Analyses `texts` (cached ones from the cache), within the time limit and budget."""
        started = time.perf_counter()
        keys = [self._key(text, entities, threshold) for text in texts]
        result = ScanResult(findings=[None] * len(texts))
        jobs: dict[bytes, str] = {}
        budget = self.max_chars
        over: list[int] = []
        for i, (key, text) in enumerate(zip(keys, texts, strict=True)):
            found = self._cached(key) if cache else None
            if found is not None:
                result.findings[i] = found
                result.cached += 1
            elif key in jobs:
                continue
            elif len(text) <= budget:
                jobs[key] = text
                budget -= len(text)
            else:
                over.append(i)
        results: dict[bytes, tuple[Finding, ...]] = {}
        if jobs:
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(
                self._pool, self._run, list(jobs.items()), entities, threshold, cache
            )
            try:
                async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                    results = await job
            except TimeoutError:
                result.failure = TIMEOUT
            except Exception as err:  # the analyzer's own failure
                log.error("guardrail analysis failed: %s: %s", type(err).__name__, err)
                result.failure = ERROR
            result.analysed = len(results)
            result.analysed_chars = sum(len(jobs[k]) for k in results)
        for i, key in enumerate(keys):
            if result.findings[i] is None:
                found = results.get(key)
                if found is not None:
                    result.findings[i] = found
                else:
                    result.unanalysed.append(i)
        if over and result.failure is None:
            result.failure = BUDGET
        result.seconds = time.perf_counter() - started
        return result

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
