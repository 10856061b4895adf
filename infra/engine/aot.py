"""The ``aot`` lever: models compiled ahead of time into AOTInductor packages on disk.

Why: ``torch.compile`` re-traces the UNet with Dynamo in every new process; with warm inductor
caches that is still ~35 s of a GPU worker's start (docs/performance.md). An AOTInductor package
is the compiled model itself: a later process opens it in a fraction of a second (0.01-0.14 s
for the UNet on an H100 host) and calls it without Dynamo. Packages hold no weights
(``package_constants_in_so=False``): the live module's own parameters are handed to the package
(``user_managed``), so GPU memory is not doubled and the weights stay the ones the model was
loaded with. That includes the smallest ones: inductor writes a 1-D weight of up to 8 values
(the UNet's and the decoder's last biases) into the kernels' code unless told to keep every tensor a
constant (``always_keep_tensor_constants``), and such a package would give another model of the
same architecture the first one's bias.

``use_aot_packages(module, cache_dir, name)`` routes the module's calls through an
``AotDispatcher``. Each call is keyed by its signature (tensor shapes, dtypes, strides, devices,
the other arguments) and by what the package depends on (torch and CUDA versions, the GPU, the
module's architecture, attention processors and parameter layouts, inductor's layout setting).
A known key runs its package; a new one is exported (``torch.export``), compiled
(``aoti_compile_and_package``), saved atomically (workers on one host share the cache) and
loaded; workers racing for one package build it once (a file lock). If any of that fails,
that signature runs under ``torch.compile`` instead and the reason is logged and kept in
``failures``: a render never fails because of this lever.

AOTInductor's runtime keeps its own reference to every user-managed constant and never drops it
(torch 2.11 and 2.13; pytorch/pytorch#194480 proposes the fix, and since the runtime is compiled
into each package, packages built before a fix keep the leak): a dropped model's weights would
stay allocated (+2.76 GiB per dropped ``fast`` UNet on an H100). ``AotDispatcher.release`` frees
them when the engine drops a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.utils._pytree as pytree
from filelock import FileLock

log = structlog.get_logger("i2vflow.engine")

PACKAGE_DIR = "aot"
# No weights in a package, not even the few values inductor would inline into its kernels' code.
PACKAGE_CONFIGS = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}
# Inductor settings that change which kernel configs a compile picks (coordinate descent: the engine's
# ``coordinate_descent_tuning`` lever; the max-autotune ones: inductor's environment variables).
TUNING_SWITCHES = ("coordinate_descent_tuning", "max_autotune", "max_autotune_gemm", "max_autotune_pointwise")


def _leaf_signature(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ["tensor", list(leaf.shape), list(leaf.stride()), str(leaf.dtype), str(leaf.device)]
    return ["value", repr(leaf)]


def module_fingerprint(module: torch.nn.Module) -> str:
    """What a package of ``module`` depends on, besides the call: a hash of architecture and layout.

    The attention processors are not in the module's ``repr`` but change the graph (fused QKV,
    the short-attention kernel); parameter strides change the kernels (channels-last weights);
    inductor's tuning switches (coordinate descent, ``TORCHINDUCTOR_MAX_AUTOTUNE``...)
    change the kernels' configs, so a tuned package and a plain one never stand in for each other.
    """
    import torch._inductor.config as inductor_config

    processors = [type(sub.processor).__name__ for sub in module.modules() if hasattr(sub, "processor")]
    parameters = [[name, list(p.shape), list(p.stride()), str(p.dtype)]
                  for name, p in module.named_parameters(remove_duplicate=False)]
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    facts = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "capability": capability,
        "package_configs": PACKAGE_CONFIGS,  # packages built with other settings (inlined weights) are rebuilt
        "architecture": repr(module),
        "processors": processors,
        "parameters": parameters,
        "force_layout_optimization": inductor_config.force_layout_optimization,
        "tuning": {name: getattr(inductor_config, name) for name in TUNING_SWITCHES},
    }
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()


class AotDispatcher:
    """Stands in for ``module.forward``: one loaded package per call signature."""

    def __init__(self, module: torch.nn.Module, cache_dir: Path, name: str) -> None:
        self.module = module
        self.folder = Path(cache_dir) / PACKAGE_DIR
        self.name = name
        self.fingerprint = module_fingerprint(module)
        self.packages: dict[str, Callable[..., Any]] = {}
        self.failures: dict[str, str] = {}
        self.compiled = 0  # packages this process built (0 on a warm start)
        self.handed: dict[str, torch.Tensor] = {}  # the weights the packages were given, by name
        self._jit: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.key(args, kwargs)
        if key in self.failures:
            return self.jit(*args, **kwargs)
        package = self.packages.get(key)
        if package is None:
            try:
                package = self.load_or_build(key, args, kwargs)
            except Exception as error:  # noqa: BLE001 - any failure here must not fail the render
                message = str(error).strip()
                self.failures[key] = f"{type(error).__name__}: {message.splitlines()[0][:300] if message else ''}"
                log.warning("aot.fallback", module=self.name, reason=self.failures[key], detail=message[-3000:],
                            fallback="torch.compile")
                return self.jit(*args, **kwargs)
            self.packages[key] = package
        return package(*args, **kwargs)

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        call = json.dumps([str(spec), [_leaf_signature(leaf) for leaf in leaves]])
        return hashlib.sha256(f"{self.fingerprint}:{call}".encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        return self.folder / f"{self.name}-{key}.pt2"

    def load_or_build(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any]:
        """Load the package for ``key``; export, compile and save it first if there is none."""
        path = self.path(key)
        if not path.exists():
            # GPU workers of one host share the cache: one builds, the others wait and load.
            with FileLock(f"{path}.lock"):
                if not path.exists():
                    self.build(path, args, kwargs)
        start = time.perf_counter()
        package = _open_package(path)
        opened = time.perf_counter()
        wanted = package.get_constant_fqns()
        state = dict(self.module.named_parameters(remove_duplicate=False))
        state.update(self.module.named_buffers(remove_duplicate=False))
        missing = [fqn for fqn in wanted if fqn not in state]
        if missing:
            raise RuntimeError(f"package {path.name} wants constants the module lacks: {missing[:3]}")
        constants = {fqn: state[fqn] for fqn in wanted}
        package.load_constants(constants, check_full_update=True, user_managed=True)
        self.handed.update(constants)
        log.info("aot.loaded", module=self.name, package=path.name, open_seconds=round(opened - start, 3),
                 seconds=round(time.perf_counter() - start, 3))
        return package

    def build(self, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Export the module at this call's inputs and compile it into ``path`` (atomically)."""
        scalars = [leaf for leaf in pytree.tree_leaves((args, kwargs))
                   if isinstance(leaf, int | float) and not isinstance(leaf, bool)]
        if scalars:
            # A Python number is baked into the graph: every new value would compile again.
            raise ValueError(f"a call with Python number arguments ({scalars[:3]}) cannot be packaged")
        start = time.perf_counter()
        with _forward_alone(self.module):
            exported = torch.export.export(self.module, args, kwargs, strict=False)
        traced = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=f".{path.stem}-", suffix=".tmp.pt2")
        os.close(handle)
        try:
            torch._inductor.aoti_compile_and_package(
                exported, package_path=temporary,
                inductor_configs=dict(PACKAGE_CONFIGS),  # it adds its own entries to the dict
            )
            os.chmod(temporary, 0o644)  # mkstemp makes it private; other workers read it too
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        self.compiled += 1
        log.info("aot.compiled", module=self.name, package=path.name, export_seconds=round(traced - start, 1),
                 compile_seconds=round(time.perf_counter() - traced, 1))

    def release(self) -> int:
        """Empty every weight handed to a package, for good; return the bytes given back.

        Only for a module about to be dropped: its weights are empty afterwards. The runtime's
        references cannot be reached from Python, but they share each weight's tensor with the
        module, so pointing that tensor at an empty storage lets the old one go (a GPU allocation,
        or the memory-mapped file a CPU model was loaded from).
        """
        self.packages.clear()
        storages = {}
        with torch.no_grad():
            for tensor in self.handed.values():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
                tensor.set_(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
        freed = sum(storages.values())
        log.info("aot.released", module=self.name, weights=len(self.handed), bytes=freed)
        self.handed.clear()
        return freed

    def jit(self, *args: Any, **kwargs: Any) -> Any:
        if self._jit is None:
            original = type(self.module).forward.__get__(self.module)
            self._jit = torch.compile(original, dynamic=False)
        return self._jit(*args, **kwargs)


@contextlib.contextmanager
def _forward_alone(module: torch.nn.Module) -> Iterator[None]:
    """Let export trace the module's own forward, without this dispatcher and without the module's
    hooks: a package stands in for ``forward``, and the hooks (``host_timesteps``,
    ``guidance_interval``) already ran around this call; traced again they would apply twice."""
    forward = module.__dict__.pop("forward")
    hooks = module._forward_pre_hooks, module._forward_hooks
    module._forward_pre_hooks, module._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        module.forward = forward
        module._forward_pre_hooks, module._forward_hooks = hooks


def _open_package(path: Path) -> Any:
    """Open a package without ``aoti_load_package``'s host check.

    That check records the host's CPU vector ISA; torch 2.11 finds it by compiling a test
    library per ISA and loading each in a fresh Python that imports torch: 23-38 s of a GPU
    worker's start on an H100 host (measured), only to log a warning on a mismatch. The package
    key already holds torch, CUDA and the GPU. Falls back to the public loader if the
    constructor moves or its signature changes.
    """
    try:
        from torch.export.pt2_archive._package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except (ImportError, AttributeError, TypeError):
        return torch._inductor.aoti_load_package(str(path))
    return AOTICompiledModel(loader)


def use_aot_packages(module: torch.nn.Module, cache_dir: str | Path, name: str) -> AotDispatcher:
    """Route ``module``'s calls through packages in ``cache_dir/aot`` (built on first use)."""
    dispatcher = AotDispatcher(module, Path(cache_dir), name)
    module.forward = dispatcher
    return dispatcher
