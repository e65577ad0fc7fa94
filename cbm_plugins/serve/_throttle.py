"""Back-off on failed logins, per client address and per user name, and a bounded password-hash pool.

Every wrong password costs a scrypt (tens of milliseconds of CPU, on purpose). Unbounded, 240 bad
logins raised a legitimate user's median latency from 8.6 ms to 170 ms. So:

* after ``FREE_FAILURES`` failed logins a client address (or a user name, whoever sends it) must
  wait before its next attempt, twice as long after each further failure, up to ``LONGEST_WAIT_S``;
  an attempt during the wait is answered 429 with Retry-After at once, without hashing anything;
  checks in flight count as failures until they end, so concurrent guesses cannot outrun the count;
  concurrent requests with the same credentials share one check;
  a successful login clears the counters;
* the user-name back-off does not hold for a client address that has logged in as that user before,
  so an attack on a name from elsewhere never locks out its owner's session; it holds before the
  cache of verified passwords is consulted, so that cache is never an unthrottled oracle;
* scrypt runs on a pool of ``hash_threads`` threads (default 1: one core) with at most
  ``hash_queue`` checks waiting; beyond that a new check is answered 503 with Retry-After.

Counters are bounded (the oldest are dropped), per server process.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

FREE_FAILURES = 5  # failed logins tolerated before the first wait
FIRST_WAIT_S = 1.0  # the first wait; doubled for every further failure
LONGEST_WAIT_S = 300.0
FORGET_AFTER_S = 900.0  # a key with no failure for this long starts afresh
MAX_KEYS = 100_000  # counters kept (client addresses + user names); the oldest are dropped
HASH_THREADS = 1
HASH_QUEUE = 16


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Failed-login counters with exponential back-off, for client addresses and user names."""

    def __init__(self, free_failures: int = FREE_FAILURES, clock=time.monotonic) -> None:
        self.free_failures = free_failures
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, _Failures] = OrderedDict()
        self._trusted: OrderedDict[tuple[str, str], None] = OrderedDict()  # (client, user) that logged in
        self._pending: Counter[str] = Counter()  # checks in flight per key

    def wait(self, key: str) -> float:
        """Seconds `key` must still wait before an attempt is checked (0: go ahead)."""
        now = self._clock()
        with self._lock:
            found = self._keys.get(key)
            return max(found.blocked_until - now, 0.0) if found else 0.0

    def begin(self, *keys: str) -> bool:
        """Reserve a password check for each key; False (nothing reserved) when a key's failures plus
        checks in flight already reach the free failures. So 16 bad logins sent at once cost as many
        scrypts as 5 sent one after the other, not 16."""
        now = self._clock()
        with self._lock:
            for key in keys:
                found = self._keys.get(key)
                count = found.count if found and now - found.last <= FORGET_AFTER_S else 0
                if count + self._pending[key] >= self.free_failures:
                    return False
            for key in keys:
                self._pending[key] += 1
            return True

    def end(self, *keys: str) -> None:
        """Release the reservations of a finished check (before failed() or succeeded())."""
        with self._lock:
            for key in keys:
                self._pending[key] -= 1
                if self._pending[key] <= 0:
                    del self._pending[key]

    def failed(self, *keys: str) -> None:
        """Count a failed login against each key (a client address, a user name)."""
        now = self._clock()
        with self._lock:
            for key in keys:
                found = self._keys.pop(key, None) or _Failures()
                if now - found.last > FORGET_AFTER_S:
                    found = _Failures()
                found.count += 1
                found.last = now
                if found.count >= self.free_failures:
                    wait = min(FIRST_WAIT_S * 2 ** (found.count - self.free_failures), LONGEST_WAIT_S)
                    found.blocked_until = now + wait
                self._keys[key] = found  # most recent last
            while len(self._keys) > MAX_KEYS:
                self._keys.popitem(last=False)

    def succeeded(self, client: str, user: str) -> None:
        """A login that passed: clear both counters and trust this client for this user."""
        with self._lock:
            for key in (client, user):
                self._keys.pop(key, None)
            self._trusted.pop((client, user), None)
            self._trusted[(client, user)] = None
            while len(self._trusted) > MAX_KEYS:
                self._trusted.popitem(last=False)

    def trusted(self, client: str, user: str) -> bool:
        """Whether this client has logged in as this user before (its session outlives a user back-off)."""
        with self._lock:
            return (client, user) in self._trusted


class HashPool:
    """A small, bounded pool for password hashing, apart from the threads that serve data."""

    def __init__(self, threads: int = HASH_THREADS, queue: int = HASH_QUEUE) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cbm-scrypt")
        self._slots = threading.BoundedSemaphore(threads + queue)

    def submit(self, function, *args) -> Future | None:
        """The check as a future, or None when the pool and its queue are full."""
        if not self._slots.acquire(blocking=False):
            return None
        future = self._pool.submit(function, *args)
        future.add_done_callback(lambda _: self._slots.release())
        return future
