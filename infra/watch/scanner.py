"""Turn a listing of the inbox into settled job candidates. Pure logic, no I/O.

Why: events lie (missed, doubled, early), so the truth is a listing compared with the
previous one. A file is *settled* once two looks at least ``settle_seconds`` apart saw the same
size and version, or at the first look that sees the exact size and version a hint vouched for
(a folder's close event: its writer is done, so a second look would only add latency).
A candidate is an image and its same-named JSON (either may arrive first); with a
``_defaults.json`` at or above it, an image alone is a job too, once it has been settled for
``grace_seconds`` without its JSON showing up (so a JSON a moment behind its image is not missed).
An image with neither, settled for ``orphan_seconds``, is a candidate with ``missing="spec"``: the
watcher reports it, so a drop never waits in silence.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from infra.jobs import DEFAULTS_NAME, IMAGE_SUFFIXES, defaults_chain, is_ignored, is_image, stem_of
from infra.store.base import ObjectInfo


@dataclass(frozen=True)
class Candidate:
    """Settled files that form one job. ``image_key`` is None for a JSON that may name its
    image with an ``"image"`` reference (the watcher reads it to find out)."""

    stem: str
    image_key: str | None
    spec_key: str | None
    defaults_keys: tuple[str, ...]
    objects: tuple[ObjectInfo, ...]
    missing: str | None = None  # "spec": an image alone past the orphan time, reported, not rendered


@dataclass
class _Look:
    size: int
    version: str
    first_seen: float
    settled_since: float | None = None


@dataclass
class Settler:
    """Remembers what each key looked like, to tell finished files from growing ones."""

    settle_seconds: float
    last_look: float = float("-inf")  # the clock reading of the latest look (what settling is measured on)
    _looks: dict[str, _Look] = field(default_factory=dict)
    # Written by a hint thread, read by the looks: (size, version) whose writer is known done.
    _vouched: dict[str, tuple[int, str]] = field(default_factory=dict)
    _vouched_lock: threading.Lock = field(default_factory=threading.Lock)
    _carried: dict[str, tuple[int, str]] = field(default_factory=dict)  # vouched, not listed yet

    def vouch(self, info: ObjectInfo) -> None:
        """Record that ``info``'s writer has finished it; the next look that sees exactly this
        size and version takes it as settled at once. Any other version settles as usual."""
        with self._vouched_lock:
            self._vouched[info.key] = (info.size, info.version)

    def observe(self, listing: Iterable[ObjectInfo], now: float | None = None) -> dict[str, ObjectInfo]:
        """Record one look; return the settled objects and how long each has been settled."""
        now = time.monotonic() if now is None else now
        self.last_look = now
        with self._vouched_lock:
            fresh, self._vouched = self._vouched, {}
        vouched = {**self._carried, **fresh}
        settled: dict[str, ObjectInfo] = {}
        seen: set[str] = set()
        for info in listing:
            seen.add(info.key)
            whole = vouched.get(info.key) == (info.size, info.version)
            look = self._looks.get(info.key)
            if look is None or (look.size, look.version) != (info.size, info.version):
                look = self._looks[info.key] = _Look(info.size, info.version, now, now if whole else None)
            elif look.settled_since is None and (whole or now - look.first_seen >= self.settle_seconds):
                look.settled_since = now
            if look.settled_since is not None:
                settled[info.key] = info
        for gone in self._looks.keys() - seen:
            del self._looks[gone]
        # A vouch that came while the listing ran may name a file it missed: keep it one more look.
        self._carried = {key: value for key, value in fresh.items() if key not in seen}
        return settled

    def settled_for(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        look = self._looks.get(key)
        return 0.0 if look is None or look.settled_since is None else now - look.settled_since

    def unsettled(self) -> set[str]:
        return {key for key, look in self._looks.items() if look.settled_since is None}


def pair(settled: dict[str, ObjectInfo], unsettled: set[str], settled_for: dict[str, float],
         grace_seconds: float, orphan_seconds: float | None = None) -> list[Candidate]:
    """Group settled files into candidates; anything with an unsettled sibling waits."""
    keys = {k for k in settled if not is_ignored(k)}
    busy_stems = {stem_of(k) for k in unsettled if not is_ignored(k)}
    defaults = {k for k in keys if k.rsplit("/", 1)[-1] == DEFAULTS_NAME}
    if any(d in unsettled for d in _all_defaults(unsettled)):
        return []  # a defaults file is being written: it may change every job below it
    images = sorted(k for k in keys if is_image(k))
    specs = {stem_of(k): k for k in keys if k.lower().endswith(".json") and k not in defaults}
    candidates: list[Candidate] = []
    taken_stems: set[str] = set()
    for image_key in images:
        stem = stem_of(image_key)
        if stem in busy_stems or stem in taken_stems:
            continue
        spec_key = specs.get(stem)
        chain = tuple(d for d in defaults_chain(image_key) if d in defaults)
        age = settled_for.get(image_key, 0.0)
        if spec_key is None and not chain and orphan_seconds and age >= orphan_seconds:
            taken_stems.add(stem)
            candidates.append(replace(_candidate(stem, image_key, None, (), settled), missing="spec"))
            continue
        if spec_key is None and (not chain or age < grace_seconds):
            continue
        taken_stems.add(stem)
        candidates.append(_candidate(stem, image_key, spec_key, chain, settled))
    for stem, spec_key in sorted(specs.items()):
        if stem not in taken_stems and stem not in busy_stems and not _has_image(stem, keys, unsettled):
            chain = tuple(d for d in defaults_chain(spec_key) if d in defaults)
            candidates.append(_candidate(stem, None, spec_key, chain, settled))
    return candidates


def _has_image(stem: str, keys: set[str], unsettled: set[str]) -> bool:
    return any(f"{stem}{suffix}" in keys | unsettled for suffix in _suffix_variants())


def _suffix_variants() -> list[str]:
    return [s for suffix in IMAGE_SUFFIXES for s in (suffix, suffix.upper())]


def _all_defaults(keys: set[str]) -> set[str]:
    return {k for k in keys if k.rsplit("/", 1)[-1] == DEFAULTS_NAME}


def _candidate(stem: str, image_key: str | None, spec_key: str | None,
               chain: tuple[str, ...], settled: dict[str, ObjectInfo]) -> Candidate:
    members = [k for k in (image_key, spec_key, *chain) if k]
    return Candidate(stem, image_key, spec_key, chain, tuple(settled[k] for k in members))
