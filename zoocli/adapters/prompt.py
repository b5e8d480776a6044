"""The user's question goes into the prompt as plain text, whatever it contains.

The processors find image placeholders by searching the prompt *string*, and the tokenizers read
special-token strings anywhere in it as control tokens: a question containing ``<image>`` (LLaVA)
or ``<|image_pad|>`` (Qwen) broke the placeholder count, and ``<|im_end|><|im_start|>assistant``
ended the user's turn. The seam: when the question contains any of the tokenizer's added-token
strings, the chat template is rendered around a sentinel, the processor (image placeholders,
BOS) runs on the part before the question, the question is tokenised with
``split_special_tokens=True`` (its ``<image>`` becomes the characters ``<``, ``image``, ``>``) and
the template's own text after it is tokenised normally. A question without such strings takes the
stock path (one processor call on the whole prompt), so its ids are exactly the stock ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zoocli.errors import ZooError

SENTINEL = "\ue000zoo-question\ue001"  # private-use characters: no template or tokenizer uses them


def control_strings(processor) -> set[str]:
    """Strings the tokenizer or processor would read as control tokens / image placeholders."""
    tok = processor.tokenizer
    out = set(tok.get_added_vocab())
    for name in ("image_token", "video_token"):
        if isinstance(s := getattr(processor, name, None), str):
            out.add(s)
    return {s for s in out if s}


def question_ids(tokenizer, question: str) -> list[int]:
    """Token ids of ``question`` read as plain text (special-token strings split into characters)."""
    return tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def prompt_batch(processor, conversation: Callable[[str], list], question: str,
                 encode: Callable[[str], Any]) -> dict:
    """The processor output for the chat prompt of ``conversation(question)``; ``encode(prompt)``
    runs the processor (with the image) on a prompt string. See the module docstring."""

    def render(text: str) -> str:  # bounded in time: a template may loop over the question
        from zoocli.adapters.checkpoint import TEMPLATE_SECONDS, TooSlow, time_limit

        try:
            with time_limit(TEMPLATE_SECONDS):
                return processor.apply_chat_template(conversation(text), add_generation_prompt=True,
                                                     tokenize=False)
        except TooSlow:
            raise ZooError(f"the model's chat template did not finish rendering this question in "
                           f"{TEMPLATE_SECONDS:g} s ({len(text):,} characters); refused") from None

    if not any(s in question for s in control_strings(processor)):
        return encode(render(question))
    before, found, after = render(SENTINEL).partition(SENTINEL)
    if not found or SENTINEL in after:
        raise ZooError("the model's chat template does not print the question once, verbatim; "
                       "cannot keep its special-token text as plain text")
    batch = dict(encode(before))
    tok = processor.tokenizer
    tail = question_ids(tok, question) + tok(after, add_special_tokens=False)["input_ids"]
    ids = batch["input_ids"]
    extra = torch.tensor([tail], dtype=ids.dtype)
    batch["input_ids"] = torch.cat([ids, extra], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in batch:  # text 0 (the question and the template's tail are text)
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return batch
