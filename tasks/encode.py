"""Task: encode frames into an H.264 MP4 and prove it by counting the frames back.

Why verify: ffmpeg can write an empty or short file without raising (odd sizes, a full disk);
a video that is not checked is not delivered.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task

from infra.engine.video import VideoInfo, encode_mp4


@task(name="encode-mp4", retries=1, retry_delay_seconds=2)
def encode_video(frames: object, fps: int) -> VideoInfo:
    """Write the frames to a temporary MP4 (yuv420p, libx264) and return what was written."""
    workdir = Path(tempfile.mkdtemp(prefix="i2vflow-"))
    return encode_mp4(frames, fps, workdir / "video.mp4")  # type: ignore[arg-type]
