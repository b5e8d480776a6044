"""The seams between adapters and the rest: one token clock, one EOS rule, what an adapter declares."""

from __future__ import annotations

import pytest
import torch

from zoocli.adapters.base import cut_at_eos
from zoocli.adapters.decoder import decoder_of
from zoocli.timing import TokenClock


class _FakeClock(TokenClock):
    """A TokenClock reading a scripted clock (no sleeps)."""

    def __init__(self, times):
        super().__init__("cpu")
        self._times = iter(times)

    def now(self):
        return next(self._times)


def test_token_clock_prefill_is_start_to_first_and_decode_first_to_last():
    c = _FakeClock([1.0, 1.5, 1.75, 2.0])
    c.start()
    scores = torch.zeros(3)
    assert c(None, scores) is scores  # usable as a logits processor: scores pass through
    c.tick()
    c.tick()
    assert c.prefill_ms == pytest.approx(500.0) and c.decode_ms == pytest.approx(500.0)


def test_token_clock_without_tokens_reports_zero():
    c = _FakeClock([3.0])
    c.start()
    assert c.prefill_ms == 0.0 and c.decode_ms == 0.0


def test_cut_at_eos_is_the_one_rule():
    assert cut_at_eos([5, 6, 2, 7], {2}) == [5, 6]
    assert cut_at_eos([5, 6, 7], {2}) == [5, 6, 7]
    assert cut_at_eos([0, 5, 0, 6, 3, 8], {3, 9}, pad=0) == [5, 6]
    assert cut_at_eos([], {1}) == []


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_llava", "tiny_qwen"])
def test_adapter_declares_dims_decoder_and_signals(request, fixture):
    adapter = request.getfixturevalue(fixture)
    lm = adapter.model.model.language_model
    dims = adapter.llm_dims()
    assert dims.num_hidden_layers == len(lm.layers) == len(adapter.decoder().layers)
    assert dims.hidden_size == lm.config.hidden_size
    emb = lm.get_input_embeddings().weight.numel()
    assert dims.n_params == sum(p.numel() for p in lm.parameters()) - emb > 0
    lin = [m for m in adapter.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert dims.projector == {"d_in": lin[0].in_features, "d_hidden": lin[0].out_features,
                              "d": lin[-1].out_features}
    assert {"vision", "projector", "prompt", "decoder"} <= adapter.provides
    assert ({"cls_attn", "vision_keys"} <= adapter.provides) == (adapter.family != "qwen2_5_vl")
    assert adapter.decoder().eos() == adapter.eos_ids
    ids = torch.tensor([3, 4, 5])
    torch.testing.assert_close(adapter.embed_ids(ids), adapter.model.get_input_embeddings()(ids))
    assert decoder_of(adapter.model).attn_impl == adapter.decoder().attn_impl


@pytest.mark.usefixtures("offline_models")
def test_bad_fastv_option_fails_on_the_command_line_before_the_model_loads():
    """Regression: ``fastv:K=abc`` was accepted at parse time and failed after loading the model.
    The model named here does not exist, so reaching the loader would be a different error."""
    from cli_helpers import one_line_error, run

    res = run("ask", "no-image.png", "q", "--model", "no-such-model", "--keep", "4",
              "--method", "fastv:K=abc", code=2)
    one_line_error(res, "fastv", "K")
