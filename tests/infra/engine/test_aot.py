"""The ``aot`` lever on a CPU, where AOTInductor compiles C++: a render through packages matches
the eager render, a fresh process loads the packages instead of compiling them, a call that
cannot be packaged runs under ``torch.compile`` with the reason kept, a package holds none of the
weights (another model of the same architecture gets its own), and a dropped engine's weights
are freed although AOTInductor keeps references to them."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
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


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compile cache for this module's tiny-model engines: later tests load what one built."""
    return tmp_path_factory.mktemp("compile-cache")


def storage_left(weights: list[weakref.ref[torch.Tensor]]) -> int:
    """Bytes still allocated for these tensors (a tensor C++ code still holds stays alive)."""
    alive = [ref() for ref in weights]
    return sum(tensor.untyped_storage().nbytes() for tensor in alive if tensor is not None)


def test_a_render_through_packages_matches_eager_and_a_new_process_reuses_them(
    model_cache: Path, engine: Engine, make_request: MakeRequest, compile_cache: Path, tmp_path: Path
) -> None:
    request = make_request(seed=11)
    eager = engine.render(request).frames

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


def test_closing_an_engine_frees_the_weights_its_packages_hold(
    model_cache: Path, make_request: MakeRequest, compile_cache: Path
) -> None:
    """AOTInductor keeps a reference to every weight handed to a package and never drops it (torch
    2.11-2.13): without the release, a dropped engine's UNet stays allocated (2.76 GiB on a GPU)."""
    engine = Engine(aot_options(compile_cache), model_cache=model_cache)
    engine.render(make_request(seed=3))
    unet = engine.warm("tiny").pipeline.unet
    weights = [weakref.ref(tensor) for tensor in unet.parameters()]
    assert storage_left(weights) > 0
    del unet

    engine.close()
    gc.collect()

    assert storage_left(weights) == 0


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


def other_weights(tiny_dir: Path, target: Path) -> Path:
    """The tiny model with every UNet weight moved: another model of the same architecture."""
    from diffusers import I2VGenXLUNet

    shutil.copytree(tiny_dir, target)
    unet = I2VGenXLUNet.from_pretrained(target / "unet")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for weight in unet.parameters():
            scale = weight.std() if weight.numel() > 1 else 1.0
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.5 * scale)
    unet.save_pretrained(target / "unet")
    return target


def test_an_engine_switching_models_renders_each_with_its_own_weights_and_frees_the_first(
    model_cache: Path, tiny_dir: Path, engine: Engine, make_request: MakeRequest, compile_cache: Path,
    tmp_path: Path,
) -> None:
    """Two models of one architecture share packages (their key holds no weights). The engine keeps
    one model: the second evicts the first, whose weights the packages held."""
    other = str(other_weights(tiny_dir, tmp_path / "other-tiny"))
    eager = engine.render(make_request(model=other, seed=5)).frames
    switching = Engine(aot_options(compile_cache), model_cache=model_cache)
    switching.render(make_request(seed=5))
    first_weights = [weakref.ref(tensor) for tensor in switching.warm("tiny").pipeline.unet.parameters()]

    switched = switching.render(make_request(model=other, seed=5))
    gc.collect()

    assert switched.speed["aot_fallbacks"] == []
    assert switching.warm(other).pipeline.unet.forward.compiled == 0  # the package the first model used
    relative = np.linalg.norm(switched.frames.astype(float) - eager) / np.linalg.norm(eager.astype(float))
    assert relative < 1e-3, relative  # its own weights, every one of them, through the shared package
    assert storage_left(first_weights) == 0


class SmallHead(torch.nn.Module):
    """A projection to 4 channels and a GroupNorm over them: weights of at most 8 values, which
    inductor writes into a package's code unless told to keep them constants."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 4)
        self.norm = torch.nn.GroupNorm(2, 4)
        torch.nn.init.normal_(self.norm.weight)
        torch.nn.init.normal_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


def test_a_package_gives_another_model_of_the_same_architecture_its_own_weights(tmp_path: Path) -> None:
    torch.manual_seed(2)
    built, other = SmallHead().eval(), SmallHead().eval()  # two models: other random weights
    x = torch.randn(6, 16)
    with torch.no_grad():
        expected = other(x)
        use_aot_packages(built, tmp_path, "head")(x)
        dispatcher = use_aot_packages(other, tmp_path, "head")
        out = other(x)

    assert dispatcher.compiled == 0 and dispatcher.failures == {}  # the first model's package, loaded
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert set(dispatcher.handed) == {name for name, _ in other.named_parameters()}


def test_release_frees_every_weight_a_package_was_handed(tmp_path: Path) -> None:
    module = SmallHead().eval()
    dispatcher = use_aot_packages(module, tmp_path, "head")
    with torch.no_grad():
        module(torch.randn(3, 16))
    weights = [weakref.ref(tensor) for tensor in module.parameters()]
    held = storage_left(weights)

    assert dispatcher.release() == held > 0
    del module, dispatcher
    gc.collect()

    assert storage_left(weights) == 0


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
