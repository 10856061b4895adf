"""How long the GPU worker's MP4 encode takes while another thread holds the GIL.

Why: a GPU worker encodes one job's video while its other slot renders the next. The engine's
default ``fast`` preset runs the UNet from an AOTInductor package, whose Python binding keeps
the GIL for its whole call (docs/performance.md: a second thread waited 138 ms through a
135 ms call); on a GPU that is each denoising step's launches, ~0.04-0.14 s. Every time the
encoding thread gives the GIL up (any file or pipe syscall, a ``sleep``) it may wait that long
to get it back, so what counts is how many times the encode gives it up.

It also times the encode as a render feeds it (``Mp4Writer``: one frame per ``--pace-ms``, the
VAE decode's pace): what a lone job waits for is the tail, from the last frame to the verified MP4.

The stand-in for the render is ``sorted()`` of a shuffled list sized to hold the GIL for
``--hold-ms`` (``list.sort`` on ints runs in C without releasing it), calibrated in this
process, so the benchmark needs no GPU, compiler or model. It reports, per hold, the encode's
median seconds alone and beside the holder, the ratio, and how many encodes failed.

    python -m benchmarks.bench_encode [--frames 16] [--size 512] [--hold-ms 40,130] [--repeats 5] [--pace-ms 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from infra.engine.video import X264_CRF, X264_PRESET, X264_TUNE, VideoEncodeError, encode_mp4_bytes, temporary_mp4

RESULTS_DIR = Path(__file__).parent / "results"


def gil_holder(hold_ms: float) -> Callable[[], None]:
    """A call that holds the GIL for about ``hold_ms`` (the list's length calibrated here)."""
    size = 200_000
    for _ in range(8):
        hold = _sort_of(size)
        took_ms = min(_ms(hold) for _ in range(2))
        if abs(took_ms - hold_ms) < 0.1 * hold_ms:
            break
        size = max(1_000, int(size * hold_ms / took_ms))
    return hold


def _sort_of(size: int) -> Callable[[], None]:
    data = list(range(size))
    random.Random(0).shuffle(data)

    def hold() -> None:
        sorted(data)

    return hold


def _ms(call: Callable[[], Any]) -> float:
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000


def time_encodes(frames: np.ndarray, fps: int, repeats: int) -> tuple[list[float], list[str]]:
    """Seconds of each ``encode_mp4_bytes`` call, and the errors of those that failed."""
    seconds, failures = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        try:
            encode_mp4_bytes(frames, fps)
            seconds.append(round(time.perf_counter() - began, 3))
        except VideoEncodeError as exc:
            failures.append(f"after {time.perf_counter() - began:.1f} s: {str(exc).splitlines()[0]}")
    return seconds, failures


def time_streamed_tails(frames: np.ndarray, fps: int, repeats: int, pace_ms: float) -> list[float]:
    """Seconds from the last frame handed to an ``Mp4Writer`` (one per ``pace_ms``) to the
    verified MP4, per encode."""
    tails = []
    for _ in range(repeats):
        with temporary_mp4(fps) as writer:
            for frame in frames:
                writer.write(frame[None])
                time.sleep(pace_ms / 1000)
            began = time.perf_counter()
            writer.close()
            tails.append(round(time.perf_counter() - began, 3))
    return tails


def beside(hold: Callable[[], None], work: Callable[[], Any]) -> Any:
    """Run ``work`` while another thread calls ``hold`` back to back."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            hold()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        return work()
    finally:
        stop.set()
        thread.join()


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--hold-ms", default="40,130", help="comma list of GIL holds to test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pace-ms", type=float, default=10.0, help="ms between frames fed to the streamed encode")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--label", default="", help="suffix of the result files' names")
    args = parser.parse_args(argv)
    # Noise frames: the hardest to compress, as the tiny model's are.
    frames = np.random.default_rng(0).integers(0, 255, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    encode_mp4_bytes(frames, args.fps)  # warm-up: ffmpeg's binary into the page cache
    alone, alone_failures = time_encodes(frames, args.fps, args.repeats)
    report: dict[str, Any] = {
        "command": "python -m benchmarks.bench_encode " + " ".join(sys.argv[1:] if argv is None else argv),
        "host": platform.node(), "python": platform.python_version(),
        "frames": args.frames, "size": args.size, "repeats": args.repeats,
        "alone": {"median_seconds": _median(alone), "seconds": alone, "failures": alone_failures},
        "x264": {"preset": X264_PRESET, "tune": X264_TUNE, "crf": X264_CRF},
        "beside_gil_holder": [],
    }
    tails = time_streamed_tails(frames, args.fps, args.repeats, args.pace_ms)
    report["streamed"] = {"pace_ms": args.pace_ms, "median_tail_seconds": _median(tails), "tail_seconds": tails}
    for hold_ms in (float(value) for value in args.hold_ms.split(",") if value):
        hold = gil_holder(hold_ms)
        measured_ms = round(_ms(hold), 1)
        seconds, failures = beside(hold, lambda: time_encodes(frames, args.fps, args.repeats))
        median = _median(seconds)
        report["beside_gil_holder"].append({
            "hold_ms": measured_ms, "median_seconds": median, "seconds": seconds, "failures": failures,
            "x_alone": round(median / report["alone"]["median_seconds"], 2) if median else None,
        })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"encode-{args.size}x{args.frames}" + (f"-{args.label}" if args.label else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    run()
