"""peer.policy.popularity: sliding-window request counts per node and site-wide, heat, and the
order across blobs it gives the engine. Time is passed in; nothing here waits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from peer.policy.popularity import SiteWindows, Window, by_heat, heat

A, B, C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
T = 1_700_000_000.0 - 1_700_000_000.0 % 60  # a bucket boundary


def test_requests_count_within_the_window_and_slide_out_bucket_by_bucket() -> None:
    w = Window(width=60.0, span=3, dedup=0.0)
    w.request(A, T)
    w.request(A, T + 61)
    w.request(A, T + 125)
    assert w.count(A, T + 125) == 3
    assert w.count(A, T + 180) == 2  # the first bucket [T, T+60) left the window
    assert w.count(A, T + 240) == 1
    assert w.count(A, T + 300) == 0
    assert w.counts(T + 125) == {A: 3}


def test_requests_close_together_are_one_request() -> None:
    w = Window(dedup=10.0)
    assert w.request(A, T)
    assert not w.request(A, T + 9.9)  # a pull's Info and the download it starts
    assert w.request(B, T + 1)  # another blob is another request
    assert w.request(A, T + 10)
    assert w.count(A, T + 10) == 2


def test_pending_is_what_the_member_reports_and_comes_back_if_the_sync_failed() -> None:
    w = Window(dedup=0.0)
    w.request(A, T)
    w.request(A, T + 1)
    w.request(B, T + 2)
    sent = w.take_pending()
    assert sent == {A: 2, B: 1} and w.take_pending() == {}
    w.request(A, T + 3)
    w.restore_pending(sent)
    assert w.take_pending() == {A: 3, B: 1}
    assert w.count(A, T + 3) == 3  # the window itself is never touched by reporting


def test_prune_forgets_what_left_the_window() -> None:
    w = Window(width=60.0, span=2, dedup=5.0)
    w.request(A, T)
    w.request(B, T + 100)
    w.prune(T + 130)
    assert w.counts(T + 130) == {B: 1} and not w.empty()
    w.prune(T + 1000)
    assert w.empty()


def test_site_windows_sum_members_and_a_full_report_replaces_one_member() -> None:
    site = SiteWindows(width=60.0, span=60)
    site.report("m1", {A: 2, B: 1}, T)
    site.report("m2", {A: 1}, T + 1)
    site.report("m1", {A: 1}, T + 2)
    assert site.count(A, T + 3) == 4 and site.count(B, T + 3) == 1
    site.report("m1", {A: 5}, T + 4, full=True)  # a new tracker hears m1's whole window
    assert site.count(A, T + 5) == 6 and site.count(B, T + 5) == 0
    assert site.hottest(T + 5, 10) == [(A, 6)]
    site.forget("m2")
    assert site.count(A, T + 5) == 5


def test_hottest_is_bounded_and_ordered() -> None:
    site = SiteWindows()
    site.report("m", {A: 1, B: 3, C: 3}, T)
    assert site.hottest(T, 2) == [(B, 3), (C, 3)]
    site.prune(T + 10 * 3600)
    assert site.members == {}


def test_heat_counts_others_at_half_weight_and_never_below_our_own() -> None:
    assert heat(2, 0) == 2
    assert heat(2, 6) == 2 + 0.5 * 4
    assert heat(3, 1) == 3  # a site count behind ours (a stale answer) takes nothing away


def test_by_heat_puts_hotter_blobs_first_and_keeps_the_given_order_among_equals() -> None:
    assert by_heat([A, B, C], {A: 1}, {B: 10}) == [B, A, C]
    assert by_heat([C, A, B], {}, {}) == [C, A, B]


@given(st.lists(st.tuples(st.sampled_from([A, B, C]), st.floats(0, 7200)), max_size=40))
def test_window_count_equals_the_requests_in_its_buckets(requests: list[tuple[str, float]]) -> None:
    w = Window(width=60.0, span=10, dedup=0.0)
    for digest, at in sorted(requests, key=lambda r: r[1]):
        w.request(digest, T + at)
    now = T + 7200
    first = int((now // 60) - 10 + 1)
    for digest in (A, B, C):
        expect = sum(1 for d, at in requests if d == digest and int((T + at) // 60) >= first)
        assert w.count(digest, now) == expect
