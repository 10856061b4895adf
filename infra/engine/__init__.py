"""The model engine: which weights (registry), how to load them (loader), how to render
(engine), how to write the video (video), and an offline tiny model for tests (tiny).

Import the submodules directly; this package imports nothing heavy on purpose, so light
processes (the watcher) can use ``infra.engine.registry`` without paying for torch.
"""
