"""A byte-level BPE tokenizer trained in-process, for the offline models (no download needed).

It encodes any string and decodes it back; the special tokens are single ids. Answers of the
offline models are meaningless anyway (random weights): the tokenizer only has to be a real,
working tokenizer so every code path (chat template, placeholders, decoding) is the real one.
"""

from __future__ import annotations

_CORPUS = [
    "What is on the monitor? Describe the image in one sentence. Is there a cat in the picture?",
    "USER: ASSISTANT: system user assistant yes no The answer is a photo of a laptop, a dog, a car.",
    "0 1 2 3 4 5 6 7 8 9 how many people are there, what colour is it, where is the coffee cup",
    "Answer the question using a single word or phrase. Reference OCR token: TOTAL CASH CHANGE",
]


def build_byte_tokenizer(
    special_tokens: list[str],
    extra_special_tokens: dict[str, str] | None = None,
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str | None = None,
    vocab_size: int = 512,
):
    """A ``PreTrainedTokenizerFast`` trained on a small built-in corpus; ``special_tokens`` come first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    kwargs = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    if unk:
        kwargs["unk_token"] = unk
    if extra_special_tokens:
        kwargs["extra_special_tokens"] = dict(extra_special_tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
