"""The ``aot`` lever on a CPU, where AOTInductor compiles C++: a render through packages matches
the eager render, a fresh process loads the packages instead of compiling them, and a call that
cannot be packaged runs under ``torch.compile`` with the reason kept."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from infra.engine.aot import module_fingerprint, use_aot_packages
from infra.engine.engine import Engine, RenderRequest
from infra.engine.loader import EngineOptions

MakeRequest = Callable[..., RenderRequest]
REPO = Path(__file__).resolve().parents[3]

# A fresh Python: the same engine options on the same caches, one render, what it compiled.
SECOND_PROCESS = """
import json, sys
from pathlib import Path
import numpy as np, PIL.Image
from infra.engine.engine import Engine, RenderRequest
from infra.engine.loader import EngineOptions

model_cache, compile_cache, out = sys.argv[1:4]
options = EngineOptions(device="cpu", compile="default", aot=True, compile_cache_dir=compile_cache)
engine = Engine(options, model_cache=Path(model_cache))
request = RenderRequest(**json.loads(sys.argv[4]), image=PIL.Image.open(sys.argv[5]))
result = engine.render(request)
np.save(out, result.frames)
unet = engine.warm("tiny").pipeline.unet
print("RESULT " + json.dumps({"compiled": unet.forward.compiled, "packages": len(unet.forward.packages),
                             "fallbacks": result.speed["aot_fallbacks"]}))
"""


def aot_options(cache: Path) -> EngineOptions:
    return EngineOptions(device="cpu", compile="default", aot=True, compile_cache_dir=str(cache))


def test_a_render_through_packages_matches_eager_and_a_new_process_reuses_them(
    model_cache: Path, engine: Engine, make_request: MakeRequest, tmp_path: Path
) -> None:
    request = make_request(seed=11)
    eager = engine.render(request).frames
    compile_cache = tmp_path / "compile-cache"

    first = Engine(aot_options(compile_cache), model_cache=model_cache).render(request)

    assert first.speed["aot"] is True and first.speed["aot_fallbacks"] == []
    assert [p.name.split("-")[0] for p in (compile_cache / "aot").glob("*.pt2")] == ["unet"]
    relative = np.linalg.norm(first.frames.astype(float) - eager) / np.linalg.norm(eager.astype(float))
    assert first.frames.shape == eager.shape and relative < 1e-3  # compiled kernels: float rounding only

    image_path = tmp_path / "image.png"
    request.image.save(image_path)
    fields = {name: getattr(request, name) for name in ("prompt", "negative_prompt", "num_frames", "fps", "steps",
                                                       "guidance_scale", "width", "height", "seed", "model")}
    out = tmp_path / "second.npy"
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, str(model_cache), str(compile_cache), str(out),
         json.dumps(fields), str(image_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert report == {"compiled": 0, "packages": 1, "fallbacks": []}  # loaded from disk, nothing rebuilt
    np.testing.assert_array_equal(np.load(out), first.frames)


class Scaled(torch.nn.Module):
    """A convolution whose forward also takes a Python number (a graph constant once exported)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.nn.functional.silu(self.conv(x)) * scale


def test_each_input_shape_gets_its_own_package_and_a_python_number_falls_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Scaled().eval()
    small, large = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = {"small": module(small), "large": module(large), "scaled": module(small, 0.5)}
    dispatcher = use_aot_packages(module, tmp_path, "scaled")

    with torch.no_grad():
        outputs = {"small": module(small), "large": module(large), "again": module(small),
                   "scaled": module(small, scale=0.5)}

    torch.testing.assert_close(outputs["small"], expected["small"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["large"], expected["large"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["again"], expected["small"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["scaled"], expected["scaled"], rtol=1e-4, atol=1e-5)
    assert dispatcher.compiled == 2 and len(list((tmp_path / "aot").glob("scaled-*.pt2"))) == 2
    assert module.forward is dispatcher  # export traced the real forward and put the dispatcher back
    (reason,) = dispatcher.failures.values()
    assert "Python number arguments ([0.5])" in reason


def test_workers_racing_for_one_package_build_it_once(tmp_path: Path) -> None:
    torch.manual_seed(1)
    first = Scaled().eval()
    second = Scaled().eval()
    second.load_state_dict(first.state_dict())
    dispatchers = [use_aot_packages(module, tmp_path, "scaled") for module in (first, second)]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = Scaled.forward(first, x)
    outputs: list[torch.Tensor] = []

    def call(module: Scaled) -> None:
        with torch.no_grad():
            outputs.append(module(x))

    threads = [threading.Thread(target=call, args=(module,)) for module in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert [d.failures for d in dispatchers] == [{}, {}]
    assert sum(d.compiled for d in dispatchers) == 1 and len(outputs) == 2
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_the_package_key_follows_processors_and_weight_layout() -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor

    attention = Attention(query_dim=32, heads=2, dim_head=16)
    before = module_fingerprint(attention)
    attention.set_processor(AttnProcessor())
    assert module_fingerprint(attention) != before  # another processor is another graph

    conv = torch.nn.Conv2d(8, 8, 3)
    plain = module_fingerprint(conv)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    assert module_fingerprint(conv) != plain  # channels-last weights: other kernels


def test_the_package_key_follows_inductors_tuning_switches() -> None:
    import torch._inductor.config as inductor_config

    conv = torch.nn.Conv2d(8, 8, 3)
    plain = module_fingerprint(conv)
    with inductor_config.patch(coordinate_descent_tuning=True):
        tuned = module_fingerprint(conv)
    with inductor_config.patch(max_autotune=True):
        autotuned = module_fingerprint(conv)
    assert len({plain, tuned, autotuned}) == 3  # a tuned package never loads for a plain run
    assert module_fingerprint(conv) == plain
