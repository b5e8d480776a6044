"""Shared fixtures: the offline tiny models, built once per session into a session tmp dir.

``tiny_llava`` / ``tiny_llava_next`` / ``tiny_qwen`` are adapters loaded through
``load_adapter`` exactly like a real checkpoint (``from_pretrained`` on the built dir), CPU, fp32.
Tests must not modify the adapters' weights.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

# The fused selection kernel (zoocli/greedy_triton.py) runs through Triton's CPU interpreter
# where there is no GPU: Triton reads its own switch when the kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def zoo_model_cache(tmp_path_factory):
    """A per-session cache dir for the offline models (no races with ~/.cache or other sessions)."""
    return tmp_path_factory.mktemp("zoo-models")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: the tiny models are far faster on one thread than on two
    contended cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def offline_models(zoo_model_cache, monkeypatch):
    """Commands that load an offline model by name build it in the session cache dir: for every
    test (autouse), so no test builds or reads a model in the user's ~/.cache/zoo. Tests that run
    zoo in a subprocess set HOME to their tmp_path for the same reason."""
    import zoocli.adapters

    monkeypatch.setattr(zoocli.adapters, "default_cache_dir", lambda: zoo_model_cache)


def _load(name, cache):
    from zoocli.adapters import load_adapter

    return load_adapter(name, device="cpu", dtype="fp32", cache_dir=cache)


@pytest.fixture(scope="session")
def tiny_llava(zoo_model_cache):
    return _load("tiny-llava", zoo_model_cache)


@pytest.fixture(scope="session")
def tiny_llava_next(zoo_model_cache):
    return _load("tiny-llava-next", zoo_model_cache)


@pytest.fixture(scope="session")
def tiny_qwen(zoo_model_cache):
    try:
        importlib.import_module("zoocli.adapters.qwen2_5_vl")
    except ImportError as e:
        pytest.skip(f"Qwen2.5-VL adapter not available: {e}")
    return _load("tiny-qwen2.5-vl", zoo_model_cache)


# Stock ``generate``'s greedy settings, spelled out: the reference side of the keep-all == stock
# tests (a checkpoint's generation config would otherwise fill what a call leaves unset)
STOCK_GREEDY = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, length_penalty=1.0,
                    no_repeat_ngram_size=0)


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture
def rand_image():
    """Factory: ``rand_image(width, height, seed=0)`` -> a deterministic random RGB image."""
    return make_image


def pytest_report_header(config):
    import torch
    import transformers

    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
