"""The decision cache and its key: TTL, LRU bound, and which input paths a key determines."""

from __future__ import annotations

import pytest

from policy.cache import DecisionCache, covers, key_of, uncovered

DOC = {
    "meshgate": {"principal": {"sub": "alice", "roles": ["admin"]}, "route": "r"},
    "attributes": {"request": {"http": {"method": "GET", "path": "/a?x=1", "headers": {"x-a": "1"}}}},
    "n": None,
}


def test_key_is_canonical_and_tells_absent_from_null() -> None:
    paths = [("meshgate", "principal"), ("attributes", "request", "http", "method")]
    reordered = {**DOC, "meshgate": {"route": "r", "principal": {"roles": ["admin"], "sub": "alice"}}}
    assert key_of(DOC, paths) == key_of(reordered, paths)
    assert key_of(DOC, [("n",)]) != key_of(DOC, [("missing",)])
    assert key_of(DOC, [("meshgate", "principal", "sub", "deeper")]) == key_of(DOC, [("nope",)])


@pytest.mark.parametrize("value", [["absent"], [], None, "", [[]]])
def test_no_present_value_keys_like_an_absent_one(value: object) -> None:
    # `?debug=absent` parses to {"debug": ["absent"]}: it must never share the key (and so the cached allow) of a
    # request without `debug`, which a policy like `allow if not input.parsed_query.debug` judges differently.
    assert key_of({"q": {"debug": value}}, [("q", "debug")]) != key_of({"q": {}}, [("q", "debug")])


def test_key_changes_with_any_keyed_value() -> None:
    paths = [("meshgate", "principal", "sub"), ("attributes", "request", "http", "path")]
    other = {**DOC, "meshgate": {"principal": {"sub": "bob"}, "route": "r"}}
    assert key_of(DOC, paths) != key_of(other, paths)


@pytest.mark.parametrize(
    ("key", "read", "expected"),
    [
        ([("a",)], ("a", "b"), True),  # the key holds the whole object the read is inside
        ([("a", "b")], ("a", "b"), True),
        ([("a", "b")], ("a",), False),  # the policy reads all of a, the key only a.b
        ([("a", "b")], ("a", "c"), False),
        ([()], ("anything",), True),  # a key over the whole input determines everything
        ([("a",)], (), False),
    ],
)
def test_covers(key: list[tuple[str, ...]], read: tuple[str, ...], expected: bool) -> None:
    assert covers(key, read) is expected


def test_uncovered_lists_each_missing_read_once_sorted() -> None:
    reads = [("b",), ("a", "x"), ("b",), ("c", "d")]
    assert uncovered([("c",)], reads) == [("a", "x"), ("b",)]


def test_entries_expire_after_ttl() -> None:
    cache: DecisionCache[str] = DecisionCache(ttl=5.0, max_entries=10)
    cache.put("k", "allow", now=100.0)
    assert cache.get("k", now=104.9) == "allow"
    assert cache.get("k", now=105.0) is None
    assert len(cache) == 0


def test_least_recently_used_entry_goes_first() -> None:
    cache: DecisionCache[int] = DecisionCache(ttl=60.0, max_entries=2)
    cache.put("a", 1, 0.0)
    cache.put("b", 2, 0.0)
    assert cache.get("a", 1.0) == 1  # a is now the most recent
    cache.put("c", 3, 1.0)
    assert cache.get("b", 1.0) is None
    assert (cache.get("a", 1.0), cache.get("c", 1.0)) == (1, 3)
