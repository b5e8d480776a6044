"""GPU correctness without a GPU: the pipeline's tensors as fake CUDA tensors (tests/fakecuda.py).

A CPU/CUDA mix raises, and so does every data-dependent host read (a hidden sync on a GPU).
LLaVA-1.5 runs encode -> select on fake CUDA from the processor's output on. LLaVA-NeXT's and
Qwen2.5-VL's stock vision towers read their grid metadata (image sizes, grid_thw) on the host
(transformers' own code, as stock ``generate`` does on a GPU), so their encode runs on the real
CPU model and selection starts from its output as fake CUDA tensors. Selection itself must be
free of host reads for every pre-LLM method with a batched kernel, on every family.
"""

from __future__ import annotations

import pytest
import torch

from fakecuda import FakeCuda
from zoocli import pipeline
from zoocli.opcount import OpCounter

pytestmark = pytest.mark.slow

# the exact estimator (the default): the sampled ones draw their directions from a CUDA
# torch.Generator, which a CPU-only build cannot make even for fake tensors
METHODS = ["zoo", "sum", "divprune", "sensitivity"]


def _fake_adapter(adapter, fc):
    """A fake CUDA copy of ``adapter``. The projector's structure probe (numerical, once per
    projector, cached: it needs values) is primed from the real module, part for part by name."""
    import dataclasses

    import zoocli.sensitivity.structure as St

    ad2 = type(adapter)(fc.module(adapter.model), adapter.processor, adapter.model_id)
    real, fake = adapter.projector, ad2.projector
    s = St.projector_structure(real)
    if s is not None:
        names = {id(m): n for n, m in real.named_modules()}
        fake_mods = dict(fake.named_modules())
        part = lambda m: fake_mods[names[id(m)]]  # noqa: E731
        norm = None if s.norm is None else dataclasses.replace(
            s.norm, weight=part(_owner(real, s.norm.weight)).weight)
        fs = St.MLP(part(s.module), part(s.lin1), part(s.act), part(s.lin2), norm)
        param = next(fake.parameters())
        St._STRUCTURE[fake] = ((param.dtype, param.device), fs)
    return ad2


def _owner(root, weight):
    return next(m for m in root.modules() if getattr(m, "weight", None) is weight)


def _select(fc, ad2, prep2, enc2, spec, keep):
    from zoocli.methods import parse_method_spec

    name, opts = parse_method_spec(spec)
    with OpCounter() as c:
        sel = pipeline.select_tokens(ad2, prep2, enc2, name, keep, options={**opts, "backend": "torch"})
    assert c.syncs == 0, c.by_op  # a device-to-host copy is not an error to fake tensors: count it
    return sel


@pytest.mark.parametrize("spec", METHODS)
def test_llava_encode_and_select_on_fake_cuda(tiny_llava, rand_image, spec):
    prepared = tiny_llava.prepare(rand_image(400, 336), "What is this?")
    fc = FakeCuda()
    ad2 = _fake_adapter(tiny_llava, fc)
    with fc:
        prep2 = fc.prepared(prepared)
        enc = ad2.encode(prep2)
        assert enc.features.device.type == "cuda" and enc.vision.device.type == "cuda"
        sel = _select(fc, ad2, prep2, enc, spec, 16)
    assert sel.kept.device.type == "cuda" and tuple(sel.kept.shape) == (16,)
    if sel.scores is not None:
        assert sel.scores.device.type == "cuda"


@pytest.mark.parametrize("scope", ["crop", "global"])
@pytest.mark.parametrize("spec", METHODS)
@pytest.mark.parametrize("family", ["tiny_llava_next", "tiny_qwen"])
def test_select_on_fake_cuda(request, rand_image, family, spec, scope):
    adapter = request.getfixturevalue(family)
    prepared = adapter.prepare(rand_image(400, 336), "What is this?")
    enc = adapter.encode(prepared)
    keep = max(2, enc.features.shape[0] // 4)
    fc = FakeCuda()
    ad2 = _fake_adapter(adapter, fc)
    with fc:
        prep2, enc2 = fc.prepared(prepared), fc.encoded(enc)
        from zoocli.methods import parse_method_spec

        name, opts = parse_method_spec(spec)
        with OpCounter() as c:
            sel = pipeline.select_tokens(ad2, prep2, enc2, name, keep, scope=scope,
                                         options={**opts, "backend": "torch"})
        assert c.syncs == 0, c.by_op
    assert sel.kept.device.type == "cuda" and sel.kept.shape[0] == keep


def test_fake_cuda_catches_a_host_read_and_a_device_mix():
    """The harness is not vacuous: a .item() and a CPU/CUDA mix both raise."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    fc = FakeCuda()
    with fc:
        x = torch.empty(4, device="cuda")
        with pytest.raises(DataDependentOutputException):
            x.sum().item()
        with pytest.raises(Exception, match="device"):
            _ = x + torch.ones(4)
