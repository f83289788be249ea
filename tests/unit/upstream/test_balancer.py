"""Load balancers: the shared pick contract for every policy, then each policy's own distribution."""

from __future__ import annotations

import heapq
import random
from collections import Counter

import pytest

from gateway.config.snapshot import LB_POLICIES, Address, LbPolicy
from gateway.upstream import balancer as balancer_module
from gateway.upstream.balancer import (
    Balancer,
    LeastRequest,
    PeakEwma,
    RoundRobin,
    WeightedRoundRobin,
    build_balancer,
)
from gateway.upstream.ring_hash import RingHash, hash_key_64
from gateway.upstream.state import Endpoint


def endpoints(*weights: int, cluster: str = "c") -> list[Endpoint]:
    return [Endpoint(cluster, Address(f"10.0.0.{i + 1}", 8080), w) for i, w in enumerate(weights)]


def balanced(policy: LbPolicy, eps: list[Endpoint], seed: int = 7) -> Balancer:
    balancer = build_balancer(policy, random.Random(seed))
    balancer.update(eps)
    return balancer


def picks(balancer: Balancer, count: int, *, key: bool = True, avoid: Endpoint | None = None) -> list[Endpoint]:
    """``count`` picks; with ``key`` each uses a distinct hash key so ring_hash spreads like the others."""
    out = []
    for i in range(count):
        endpoint = balancer.pick(f"user-{i}" if key else None, now=float(i), avoid=avoid)
        assert endpoint is not None
        out.append(endpoint)
    return out


# ---- the contract every policy honours ------------------------------------------------------------------------


def test_every_policy_has_a_balancer() -> None:
    for policy in LB_POLICIES:
        assert isinstance(build_balancer(policy, random.Random(0)), Balancer)


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown load-balancing policy 'fastest'"):
        build_balancer("fastest", random.Random(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_empty_set_gives_none(policy: LbPolicy) -> None:
    balancer = build_balancer(policy, random.Random(0))
    assert balancer.pick("k", 0.0) is None
    balancer.update([])
    assert balancer.pick("k", 0.0) is None
    assert balancer.pick(None, 0.0) is None


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_update_replaces_the_set(policy: LbPolicy) -> None:
    old, new = endpoints(1, 1), endpoints(1, 1, cluster="other")
    balancer = balanced(policy, old)
    balancer.update(new)
    assert balancer.endpoints == tuple(new)
    assert {id(e) for e in picks(balancer, 50)} <= {id(e) for e in new}


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_single_endpoint(policy: LbPolicy) -> None:
    (only,) = eps = endpoints(3)
    balancer = balanced(policy, eps)
    assert picks(balancer, 5) == [only] * 5
    assert balancer.pick("k", 0.0, avoid=only) is only  # the only one: a retry goes back to it
    only.healthy = False
    assert balancer.pick("k", 0.0) is None
    assert balancer.pick("k", 0.0, avoid=only) is None


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_unavailable_endpoints_are_skipped(policy: LbPolicy) -> None:
    eps = endpoints(1, 2, 1, 3)
    eps[1].healthy = False
    eps[3].healthy = False
    chosen = picks(balanced(policy, eps), 400)
    assert {e.key for e in chosen} == {eps[0].key, eps[2].key}


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_all_unavailable_gives_none(policy: LbPolicy) -> None:
    eps = endpoints(1, 1, 1)
    for endpoint in eps:
        endpoint.healthy = False
    balancer = balanced(policy, eps)
    assert balancer.pick("k", 0.0) is None
    assert balancer.pick(None, 0.0, avoid=eps[0]) is None


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_avoid_is_passed_over_when_another_is_available(policy: LbPolicy) -> None:
    eps = endpoints(1, 1, 1)
    for avoided in eps:
        chosen = picks(balanced(policy, eps), 300, avoid=avoided)
        assert avoided not in chosen
        assert len(set(map(id, chosen))) == 2  # and the others still share the retries


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_avoid_falls_back_when_it_is_the_only_available(policy: LbPolicy) -> None:
    eps = endpoints(1, 1, 1)
    eps[0].healthy = False
    eps[2].healthy = False
    balancer = balanced(policy, eps)
    assert all(balancer.pick(f"k{i}", 0.0, avoid=eps[1]) is eps[1] for i in range(50))


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_avoid_outside_the_set_is_ignored(policy: LbPolicy) -> None:
    eps = endpoints(1, 1)
    stranger = endpoints(1, cluster="other")[0]
    eps[0].healthy = False
    assert balanced(policy, eps).pick("k", 0.0, avoid=stranger) is eps[1]


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_same_seed_same_choices(policy: LbPolicy) -> None:
    eps = endpoints(1, 2, 3)
    assert picks(balanced(policy, eps, seed=3), 100) == picks(balanced(policy, eps, seed=3), 100)


def trip(endpoint: Endpoint, now: float) -> None:
    for _ in range(endpoint.breaker.settings.consecutive_failures):
        endpoint.breaker.record_failure(now, random.Random(0))


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_ejected_endpoints_are_skipped_until_their_time_passes(policy: LbPolicy) -> None:
    eps = endpoints(1, 1, 1)
    eps[1].ejected_until = 500.0
    balancer = balanced(policy, eps)
    before = {id(balancer.pick(f"k{i}", 499.0)) for i in range(300)}
    assert before == {id(eps[0]), id(eps[2])}
    after = {id(balancer.pick(f"k{i}", 500.0)) for i in range(300)}
    assert id(eps[1]) in after  # back without anyone un-ejecting it


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_tripped_breaker_is_skipped_and_probing_admits_one_probe(policy: LbPolicy) -> None:
    eps = endpoints(1, 1)
    trip(eps[0], now=0.0)
    until = eps[0].breaker.tripped_until
    balancer = balanced(policy, eps)
    assert all(balancer.pick(f"k{i}", until - 0.01) is eps[1] for i in range(100))
    eps[1].healthy = False  # leave the probing endpoint as the only candidate
    probe = balancer.pick("k", until)
    assert probe is eps[0]
    probe.breaker.on_attempt(until)
    assert balancer.pick("k", until) is None  # the probe is in flight: nothing else goes there
    probe.breaker.record_success(until + 0.01)
    assert balancer.pick("k", until + 0.01) is eps[0]


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_panic_ignores_health_and_ejection_but_not_breakers(policy: LbPolicy) -> None:
    eps = endpoints(1, 1, 1, 1)
    eps[0].healthy = False
    eps[1].ejected_until = 100.0
    trip(eps[2], now=0.0)
    eps[3].healthy = False
    balancer = balanced(policy, eps)
    assert balancer.pick("k", 1.0) is None
    chosen = {id(balancer.pick(f"k{i}", 1.0, panic=True)) for i in range(300)}
    assert chosen == {id(eps[0]), id(eps[1]), id(eps[3])}
    assert balancer.pick("k", 1.0, avoid=eps[0], panic=True) is not eps[0]


# ---- round robin ----------------------------------------------------------------------------------------------


def test_round_robin_cycles_in_list_order_from_a_random_start() -> None:
    eps = endpoints(1, 5, 1, 1)  # weights are ignored
    starts = set()
    for seed in range(20):
        chosen = picks(balanced("round_robin", eps, seed=seed), 12)
        first = eps.index(chosen[0])
        starts.add(first)
        assert chosen == [eps[(first + i) % 4] for i in range(12)]
    assert len(starts) > 1


def test_round_robin_skips_unavailable_and_keeps_order() -> None:
    eps = endpoints(1, 1, 1, 1)
    balancer = RoundRobin(random.Random(0))
    balancer.update(eps)
    eps[1].healthy = False
    chosen = picks(balancer, 9)
    first = [eps[0], eps[2], eps[3]].index(chosen[0])
    assert chosen == [[eps[0], eps[2], eps[3]][(first + i) % 3] for i in range(9)]


# ---- smooth weighted round robin ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((5, 1, 1), "aabacaa"),  # nginx's own example in ngx_http_upstream_round_robin.c
        ((1, 1, 1), "abc"),
        ((4, 4, 4), "abc"),  # scaled by the gcd: same as equal weights
        ((2, 1), "aba"),
        ((3, 2), "ababa"),
        ((1, 2, 3), "cbacbc"),  # ties go to the first in list order
    ],
)
def test_smooth_weighted_round_robin_matches_nginx(weights: tuple[int, ...], expected: str) -> None:
    eps = endpoints(*weights)
    names = {id(e): "abcdef"[i] for i, e in enumerate(eps)}
    balancer = balanced("weighted_round_robin", eps)
    sequence = "".join(names[id(e)] for e in picks(balancer, 3 * len(expected)))
    assert sequence == expected * 3


def test_smooth_weighted_round_robin_live_mode_gives_the_same_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = endpoints(7, 3, 1, 5)
    precomputed = picks(balanced("weighted_round_robin", eps), 64)
    monkeypatch.setattr(balancer_module, "_MAX_SCHEDULE_WORK", 1)
    live = balanced("weighted_round_robin", eps)
    assert isinstance(live, WeightedRoundRobin)
    assert live._schedule is None
    assert picks(live, 64) == precomputed
    eps[0].healthy = False
    assert {id(e) for e in picks(live, 30)} == {id(e) for e in eps[1:]}
    assert all(live.pick(None, 0.0, avoid=eps[1]) is not eps[1] for _ in range(30))
    for endpoint in eps[2:]:
        endpoint.healthy = False
    assert live.pick(None, 0.0, avoid=eps[1]) is eps[1]


def test_smooth_weighted_round_robin_keeps_shares_when_one_is_unavailable() -> None:
    eps = endpoints(5, 3, 2)
    balancer = balanced("weighted_round_robin", eps)
    eps[0].healthy = False
    counts = Counter(e.key for e in picks(balancer, 500))
    assert counts == {eps[1].key: 300, eps[2].key: 200}


# ---- random ---------------------------------------------------------------------------------------------------


def test_random_is_weighted() -> None:
    eps = endpoints(1, 2, 7)
    counts = Counter(e.key for e in picks(balanced("random", eps), 10_000))
    for endpoint in eps:
        assert counts[endpoint.key] / 10_000 == pytest.approx(endpoint.weight / 10, abs=0.02)


def test_random_with_equal_weights_is_uniform() -> None:
    eps = endpoints(2, 2, 2, 2)
    counts = Counter(e.key for e in picks(balanced("random", eps), 10_000))
    assert all(c / 10_000 == pytest.approx(0.25, abs=0.02) for c in counts.values())


# ---- power of two choices -------------------------------------------------------------------------------------


def test_least_request_prefers_the_less_loaded_of_two() -> None:
    idle, busy = eps = endpoints(1, 1)
    busy.in_flight = 3
    assert picks(balanced("least_request", eps), 100) == [idle] * 100


def test_least_request_never_picks_the_most_loaded_and_favours_the_least() -> None:
    eps = endpoints(1, 1, 1)
    for endpoint, load in zip(eps, (0, 5, 10), strict=True):
        endpoint.in_flight = load
    counts = Counter(e.key for e in picks(balanced("least_request", eps), 3000))
    assert counts[eps[2].key] == 0
    assert counts[eps[0].key] / 3000 == pytest.approx(2 / 3, abs=0.03)  # it wins both pairs it is drawn in


def test_least_request_ties_are_broken_at_random() -> None:
    eps = endpoints(1, 1)
    counts = Counter(e.key for e in picks(balanced("least_request", eps), 2000))
    assert counts[eps[0].key] / 2000 == pytest.approx(0.5, abs=0.05)


def test_least_request_scales_load_by_weight() -> None:
    heavy, light = eps = endpoints(2, 1)
    heavy.in_flight, light.in_flight = 2, 1  # (2+1)/2 = 1.5 < (1+1)/1 = 2
    assert isinstance(balanced("least_request", eps), LeastRequest)
    assert picks(balanced("least_request", eps), 20) == [heavy] * 20


def test_peak_ewma_prefers_the_lower_cost() -> None:
    fast, slow = eps = endpoints(1, 1)
    for endpoint, rtt in ((fast, 0.005), (slow, 0.100)):
        endpoint.start()
        endpoint.finish(rtt, now=0.0)
    balancer = balanced("peak_ewma", eps)
    assert isinstance(balancer, PeakEwma)
    assert all(balancer.pick(None, now=1.0) is fast for _ in range(50))
    for _ in range(25):  # 26 queued requests at 5 ms cost more than an idle endpoint at 100 ms
        fast.start()
    assert balancer.pick(None, now=1.0) is slow


def simulate(policy: LbPolicy, latency: dict[str, list[float]], requests: int, interval: float) -> list[Counter[str]]:
    """Open-loop run: a request every ``interval`` s; endpoint ``k`` answers after ``latency[k][phase]`` s, where the
    run is split into ``len(latency[k])`` equal phases. Returns the pick counts per phase."""
    eps = [Endpoint("c", Address(name, 80)) for name in latency]
    balancer = balanced(policy, eps, seed=11)
    phases = len(next(iter(latency.values())))
    counts: list[Counter[str]] = [Counter() for _ in range(phases)]
    pending: list[tuple[float, int, Endpoint, float]] = []  # (done_at, seq, endpoint, sent_at)
    for seq in range(requests):
        now = seq * interval
        while pending and pending[0][0] <= now:
            done_at, _, done, sent_at = heapq.heappop(pending)
            done.finish(done_at - sent_at, done_at)
        chosen = balancer.pick(None, now)
        assert chosen is not None
        phase = seq * phases // requests
        counts[phase][chosen.address.host] += 1
        chosen.start()
        heapq.heappush(pending, (now + latency[chosen.address.host][phase], seq, chosen, now))
    return counts


def test_peak_ewma_sends_most_traffic_to_the_fast_endpoint() -> None:
    (counts,) = simulate("peak_ewma", {"fast": [0.002], "slow": [0.050]}, requests=10_000, interval=0.001)
    assert counts["fast"] / 10_000 > 0.95
    # least_request only sees the queue, which latency inflates only a little at this rate: a much weaker preference
    (baseline,) = simulate("least_request", {"fast": [0.002], "slow": [0.050]}, requests=10_000, interval=0.001)
    assert baseline["fast"] < counts["fast"]


def test_peak_ewma_moves_traffic_away_when_the_fast_endpoint_slows_down() -> None:
    first, second = simulate("peak_ewma", {"a": [0.002, 0.080], "b": [0.040, 0.004]}, requests=20_000, interval=0.001)
    assert first["a"] / 10_000 > 0.9
    assert second["b"] / 10_000 > 0.9


# ---- ring hash ------------------------------------------------------------------------------------------------

KEYS = [f"session-{i}" for i in range(10_000)]


def owners(balancer: Balancer) -> dict[str, str]:
    result = {}
    for key in KEYS:
        endpoint = balancer.pick(key, 0.0)
        assert endpoint is not None
        result[key] = endpoint.key
    return result


def test_hash_key_64_is_stable_across_processes() -> None:
    # Golden value: BLAKE2b is fixed by RFC 7693, unlike hash(), which PYTHONHASHSEED salts per process.
    assert hash_key_64("user-1") == 0x88E1EA21865AAC9A
    assert 0 <= hash_key_64("") < 2**64


def test_ring_hash_same_key_same_endpoint_across_instances_and_seeds() -> None:
    eps = endpoints(1, 1, 1, 1)
    first = owners(balanced("ring_hash", eps, seed=1))
    again = owners(balanced("ring_hash", endpoints(1, 1, 1, 1), seed=99))  # new objects, new rng
    assert first == again
    assert len(set(first.values())) == 4


def test_ring_hash_spreads_equal_endpoints_evenly() -> None:
    counts = Counter(owners(balanced("ring_hash", endpoints(1, 1, 1, 1))).values())
    assert all(c / len(KEYS) == pytest.approx(0.25, abs=0.06) for c in counts.values())


def test_ring_hash_adding_a_fifth_endpoint_moves_about_a_fifth_of_keys_and_only_to_it() -> None:
    four = endpoints(1, 1, 1, 1, 1)[:4]
    five = endpoints(1, 1, 1, 1, 1)
    before = owners(balanced("ring_hash", four))
    after = owners(balanced("ring_hash", five))
    moved = [key for key in KEYS if before[key] != after[key]]
    assert 0.12 <= len(moved) / len(KEYS) <= 0.28
    assert {after[key] for key in moved} == {five[4].key}  # none moved between the old four


def test_ring_hash_removing_an_endpoint_moves_only_its_keys() -> None:
    eps = endpoints(1, 1, 1, 1, 1)
    before = owners(balanced("ring_hash", eps))
    after = owners(balanced("ring_hash", eps[:2] + eps[3:]))
    assert all(before[key] == after[key] for key in KEYS if before[key] != eps[2].key)


def test_ring_hash_unavailable_owner_hands_keys_to_where_removal_would() -> None:
    eps = endpoints(1, 1, 1, 1, 1)
    balancer = balanced("ring_hash", eps)
    eps[2].healthy = False
    without = owners(balanced("ring_hash", eps[:2] + eps[3:]))
    assert owners(balancer) == without


def test_ring_hash_avoid_moves_a_key_to_a_different_endpoint() -> None:
    eps = endpoints(1, 1, 1)
    balancer = balanced("ring_hash", eps)
    for key in KEYS[:200]:
        first = balancer.pick(key, 0.0)
        retry = balancer.pick(key, 0.0, avoid=first)
        assert retry is not None
        assert retry is not first
        assert balancer.pick(key, 0.0, avoid=first) is retry  # and the retry target is itself consistent


def test_ring_hash_honours_weights() -> None:
    eps = endpoints(3, 1)
    counts = Counter(owners(balanced("ring_hash", eps)).values())
    assert counts[eps[0].key] / len(KEYS) == pytest.approx(0.75, abs=0.06)


def test_ring_hash_without_a_key_is_weighted_random() -> None:
    eps = endpoints(3, 1)
    counts = Counter(e.key for e in picks(balanced("ring_hash", eps), 10_000, key=False))
    assert counts[eps[0].key] / 10_000 == pytest.approx(0.75, abs=0.06)


@pytest.mark.parametrize(
    ("weights", "per_weight", "max_ring", "size"),
    [
        ((1, 1, 1), 256, 1 << 16, 768),
        ((2, 4, 6), 256, 1 << 16, 6 * 256),  # gcd 2: units 1, 2, 3
        ((1, 1, 1), 256, 300, 300),  # capped: 100 points per unit
        ((1000, 1), 256, 100, 1001),  # never below one point per unit
    ],
)
def test_ring_hash_ring_size(weights: tuple[int, ...], per_weight: int, max_ring: int, size: int) -> None:
    balancer = RingHash(random.Random(0), vnodes_per_weight=per_weight, max_ring=max_ring)
    balancer.update(endpoints(*weights))
    assert len(balancer._hashes) == size
    assert balancer._hashes == sorted(balancer._hashes)


def test_ring_hash_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        RingHash(random.Random(0), vnodes_per_weight=0)


def test_ring_hash_accepts_any_string_key() -> None:
    balancer = balanced("ring_hash", endpoints(1, 1))
    assert balancer.pick("\udcff lone surrogate from a raw header", 0.0) is not None
