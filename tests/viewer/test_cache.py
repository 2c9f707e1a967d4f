"""The byte-bounded LRU cache behind decoded frames and rendered images."""

from __future__ import annotations

import threading

from viewer.cache import ByteLRU


def test_evicts_least_recently_used_within_the_byte_budget():
    cache: ByteLRU[bytes] = ByteLRU(10, len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")  # 12 bytes > 10: b (least recent) goes
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"1234"
    assert cache.bytes == 8 and len(cache) == 2


def test_value_larger_than_budget_is_not_kept_and_replacing_updates_size():
    cache: ByteLRU[bytes] = ByteLRU(10, len)
    cache.put("big", b"x" * 11)
    assert cache.get("big") is None and cache.bytes == 0
    cache.put("k", b"12345")
    cache.put("k", b"12")
    assert cache.bytes == 2 and cache.get("k") == b"12"


def test_threads_never_exceed_the_budget():
    cache: ByteLRU[bytes] = ByteLRU(1000, len)

    def work(n: int) -> None:
        for i in range(500):
            cache.put((n, i % 50), b"x" * (i % 97))
            cache.get((n, (i * 7) % 50))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < cache.bytes <= 1000
    assert cache.bytes == sum(len(cache._items[k][0]) for k in cache._items)
