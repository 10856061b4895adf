"""Settling and pairing: pure logic over listings, driven by an explicit clock."""

from __future__ import annotations

from infra.jobs import defaults_chain, is_ignored, make_job_id, resolve_reference, stem_of
from infra.store.base import ObjectInfo
from infra.watch.scanner import Settler, pair


def _info(key: str, size: int = 10, version: str = "v1") -> ObjectInfo:
    return ObjectInfo(key, size, version)


def test_a_file_settles_only_after_two_equal_looks_apart() -> None:
    settler = Settler(settle_seconds=1.0)
    assert settler.observe([_info("a.png", 5)], now=0.0) == {}
    assert settler.observe([_info("a.png", 9)], now=1.5) == {}, "still growing"
    assert settler.observe([_info("a.png", 9)], now=2.0) == {}, "too soon after the change"
    assert list(settler.observe([_info("a.png", 9)], now=2.6)) == ["a.png"]
    assert settler.observe([_info("a.png", 9, "v2")], now=3.0) == {}, "rewritten: settle again"
    assert settler.observe([], now=4.0) == {} and settler.unsettled() == set()


def test_a_vouched_version_settles_at_its_first_look_and_no_other() -> None:
    settler = Settler(settle_seconds=1.0)
    settler.vouch(_info("a.png", 9))
    settler.vouch(_info("b.png", 9))
    settler.vouch(_info("late.png", 4))
    seen = settler.observe([_info("a.png", 9), _info("b.png", 5)], now=0.0)
    assert list(seen) == ["a.png"], "b.png grew after its writer closed it: the listing's version was never vouched"
    assert settler.unsettled() == {"b.png"}
    settler.vouch(_info("b.png", 5))  # a late close event for what the last look already saw
    assert set(settler.observe([_info("a.png", 9), _info("b.png", 5)], now=0.1)) == {"a.png", "b.png"}
    assert list(settler.observe([_info("late.png", 4)], now=0.2)) == [], "a vouch is carried one look, no more"
    assert settler.observe([_info("late.png", 4)], now=0.3) == {}
    assert list(settler.observe([_info("late.png", 4)], now=1.3)) == ["late.png"], "then two looks, as ever"


def test_without_a_settle_period_a_file_still_needs_a_second_look_unless_vouched() -> None:
    settler = Settler(settle_seconds=0.0)
    settler.vouch(_info("closed.png", 3))
    assert list(settler.observe([_info("closed.png", 3), _info("growing.png", 1)], now=0.0)) == ["closed.png"]
    assert set(settler.observe([_info("closed.png", 3), _info("growing.png", 1)], now=0.0)) == {
        "closed.png", "growing.png"}


def _pair(keys: list[str], unsettled: set[str] = frozenset(), settled_for: float = 10.0):
    settled = {k: _info(k) for k in keys}
    return pair(settled, set(unsettled), {k: settled_for for k in keys}, grace_seconds=1.0)


def test_image_and_json_pair_in_any_folder() -> None:
    found = _pair(["shoe.png", "shoe.json", "a/b/red x.v2.JPG", "a/b/red x.v2.json"])
    assert {(c.stem, c.image_key, c.spec_key) for c in found} == {
        ("shoe", "shoe.png", "shoe.json"), ("a/b/red x.v2", "a/b/red x.v2.JPG", "a/b/red x.v2.json")}


def test_lonely_image_waits_unless_defaults_apply() -> None:
    assert _pair(["shoe.png"]) == []
    found = _pair(["shoes/_defaults.json", "shoes/red.png", "other/blue.png"])
    assert [(c.stem, c.defaults_keys) for c in found] == [("shoes/red", ("shoes/_defaults.json",))]


def test_a_lonely_image_past_the_orphan_time_is_a_candidate_marked_missing_its_spec() -> None:
    settled = {k: _info(k) for k in ("shoe.png", "shoes/_defaults.json", "shoes/red.png")}
    ages = dict.fromkeys(settled, 30.0)
    assert pair(settled, set(), ages, grace_seconds=1.0, orphan_seconds=60.0) == [
        c for c in pair(settled, set(), ages, grace_seconds=1.0) if c.stem == "shoes/red"]  # not yet
    ages["shoe.png"] = 61.0
    found = {c.stem: c for c in pair(settled, set(), ages, grace_seconds=1.0, orphan_seconds=60.0)}
    assert (found["shoe"].missing, found["shoe"].spec_key, found["shoe"].image_key) == ("spec", None, "shoe.png")
    assert found["shoes/red"].missing is None  # its _defaults.json makes it a job
    assert [c.stem for c in pair(settled, set(), {k: 1e9 for k in settled}, 1.0)] == ["shoes/red"]  # no orphan time


def test_image_with_defaults_waits_a_grace_period_for_its_json() -> None:
    assert _pair(["_defaults.json", "red.png"], settled_for=0.2) == []
    assert len(_pair(["_defaults.json", "red.png"], settled_for=2.0)) == 1


def test_unsettled_sibling_or_defaults_holds_the_job_back() -> None:
    assert _pair(["shoe.png"], unsettled={"shoe.json"}) == []
    assert _pair(["shoe.png", "shoe.json"], unsettled={"_defaults.json"}) == []


def test_json_alone_is_a_candidate_for_an_image_reference() -> None:
    found = _pair(["spec-only.json"])
    assert [(c.image_key, c.spec_key) for c in found] == [(None, "spec-only.json")]
    assert _pair(["x.json"], unsettled={"x.png"}) == [], "its image is still arriving"


def test_ignored_names() -> None:
    assert is_ignored(".hidden.png") and is_ignored("a/.git/x.png") and is_ignored("big.png.part")
    assert is_ignored("x.TMP") and not is_ignored("ok.png") and not is_ignored("a/_defaults.json")


def test_keys_and_references() -> None:
    assert stem_of("a/b c.d.png") == "a/b c.d" and stem_of("x.webp") == "x"
    assert defaults_chain("a/b/c.png") == ["_defaults.json", "a/_defaults.json", "a/b/_defaults.json"]
    assert resolve_reference("a/s.json", "../p.png") == "p.png"
    assert resolve_reference("a/s.json", "../../p.png") is None
    assert resolve_reference("s.json", "/etc/passwd") is None
    assert resolve_reference("s.json", "sub/./p.png") == "sub/p.png"


def test_job_id_depends_on_route_name_and_every_content_hash() -> None:
    route, defaults = "/in -> /out", [("_defaults.json", "d")]
    base = make_job_id(route, "shoe", "img", "spec", defaults)
    assert base == make_job_id(route, "shoe", "img", "spec", list(defaults))
    assert len({base, make_job_id(route, "boot", "img", "spec", defaults),
                make_job_id(route, "shoe", "img2", "spec", defaults),
                make_job_id(route, "shoe", "img", "spec2", defaults),
                make_job_id(route, "shoe", "img", "spec", [("_defaults.json", "d2")]),
                make_job_id("s3://b/in -> s3://b/out", "shoe", "img", "spec", defaults)}) == 6
