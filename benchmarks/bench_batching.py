"""Would sharing denoising batches across queued jobs raise videos per hour? Measure before building.

Why: issue 5 asks for cross-job batching *when it raises throughput*. Two queued jobs of the same
shape cost the same compute as one pipeline call with ``num_videos_per_prompt=2`` (the UNet then
runs batch 4 with classifier-free guidance), so this times the stock pipeline at batch 1 and 2,
eager and optionally compiled, on the same GPU in one process, and prints seconds per video.

    python -m benchmarks.bench_batching --size 512 --frames 16 --steps 50 --compile
    python -m benchmarks.bench_batching --tiny                       # CPU path (test suite)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_engine import Bench, cuda_ok, parse_args, prepare_model


def seconds_per_video(bench: Bench, pipe: Any, batch: int, repeats: int) -> float:
    import torch

    def call() -> None:
        request = bench.request()
        pipe(prompt=request.prompt, image=request.image, height=request.height, width=request.width,
             num_frames=request.num_frames, target_fps=request.fps, num_inference_steps=request.steps,
             guidance_scale=request.guidance_scale, num_videos_per_prompt=batch,
             decode_chunk_size=1 if cuda_ok(bench.device) else request.num_frames,
             generator=torch.Generator(device=bench.device).manual_seed(request.seed), output_type="np")
        if cuda_ok(bench.device):
            torch.cuda.synchronize()

    call()  # warm-up (and compilation for a new batch shape)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    compiled = "--compile" in argv
    args = parse_args([a for a in argv if a != "--compile"])
    model_source, model_cache = prepare_model(args)
    bench = Bench(args, model_source, model_cache)
    report: dict[str, Any] = {"command": "python -m benchmarks.bench_batching " + " ".join(argv),
                              "size": args.size, "frames": args.frames, "steps": args.steps, "rows": []}
    pipe = bench.load_stock()
    for mode in ["eager", "compiled"] if compiled else ["eager"]:
        if mode == "compiled":
            import torch

            pipe.unet = torch.compile(pipe.unet)
        one = seconds_per_video(bench, pipe, 1, args.repeats)
        two = seconds_per_video(bench, pipe, 2, args.repeats)
        row = {"mode": mode, "s_per_video_batch1": round(one, 3), "s_per_video_batch2": round(two, 3),
               "videos_per_hour_gain": round(one / two, 3)}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out) / f"batching-{'cpu' if not cuda_ok(bench.device) else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
