"""Checks of a local checkpoint directory, so that every failure to load one is one line naming the
file at fault and what is wrong (transformers' own errors are tracebacks, or name no file).

``check_checkpoint_dir(path)`` runs before transformers reads the directory: every ``*.json`` must
be a JSON document of sane depth (``config.json`` nested 200k deep is a ``RecursionError`` inside
transformers), every ``*.safetensors`` must have a well-formed header whose tensors lie inside the
file (a truncated, random or huge-header file), ``tokenizer.json`` must load in ``tokenizers``, and
the chat template must compile and render a probe conversation in transformers' Jinja sandbox.
``load_error(path, e)`` turns what still fails inside ``from_pretrained`` (e.g. a tensor whose
size does not match ``config.json``) into one line naming the weights file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from zoocli.errors import ZooError

MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header size
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
PROBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]


def _one_line(e: BaseException, limit: int = 200) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _bad(path: Path, what: str) -> ZooError:
    return ZooError(f"checkpoint file {path}: {what}")


def read_json(path: Path):
    """The JSON document in ``path``; ``ZooError`` naming the file for anything unreadable."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise _bad(path, "not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise _bad(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise _bad(path, f"not valid JSON ({_one_line(e, 120)})") from None
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})") from None


def safetensors_header(path: Path) -> dict:
    """The tensor table of a ``.safetensors`` file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"not a valid safetensors file (its header claims {n:,} bytes; the file "
                                 f"has {size:,}): truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise _bad(path, "not a valid safetensors file (its header is not a JSON table of tensors)")
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        _check_tensor(path, name, t, data)
    return header


def _check_tensor(path: Path, name: str, t, data: int) -> None:
    ok = (isinstance(t, dict) and t.get("dtype") in _DTYPE_BYTES and isinstance(t.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in t["shape"]) and isinstance(t.get("data_offsets"), list)
          and len(t["data_offsets"]) == 2 and all(isinstance(o, int) for o in t["data_offsets"]))
    if not ok:
        raise _bad(path, f"not a valid safetensors file (tensor '{name[:80]}' is malformed)")
    b, e = t["data_offsets"]
    if not 0 <= b <= e <= data:
        raise _bad(path, f"truncated: tensor '{name[:80]}' lies past the end of the file")
    if e - b != math.prod(t["shape"]) * _DTYPE_BYTES[t["dtype"]]:
        raise _bad(path, f"not a valid safetensors file (tensor '{name[:80]}' has the wrong byte size)")


def check_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception
        raise _bad(path, f"not a tokenizer the tokenizers library can load ({_one_line(e, 120)})") from None


def check_chat_template(path: Path, template: str) -> None:
    """Compile and render ``template`` with a probe conversation in transformers' Jinja sandbox."""
    from jinja2.exceptions import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        render_jinja_template(conversations=[PROBE], chat_template=template, add_generation_prompt=True)
    except TemplateError as e:
        raise _bad(path, f"its chat template is refused by the Jinja sandbox ({type(e).__name__}: "
                         f"{_one_line(e, 120)})") from None
    except Exception as e:  # noqa: BLE001 - a template may raise anything while rendering
        raise _bad(path, f"its chat template fails on a plain conversation ({_one_line(e, 120)})") from None


def _templates(path: Path):
    """(file, template) for each chat template saved in the directory."""
    if (p := path / "chat_template.jinja").is_file():
        try:
            yield p, p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _bad(p, f"cannot be read ({_one_line(e, 120)})") from None
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        p = path / name
        if p.is_file() and isinstance(doc := read_json(p), dict) and isinstance(doc.get("chat_template"), str):
            yield p, doc["chat_template"]


def check_checkpoint_dir(path) -> None:
    """``ZooError`` (one line, naming the file) for a broken file of a local checkpoint."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ZooError(f"model directory '{path}' has no config.json")
    for p in sorted(path.glob("*.json")):
        read_json(p)
    if not isinstance(read_json(path / "config.json"), dict):
        raise _bad(path / "config.json", "not a JSON object")
    for p in sorted(path.glob("*.safetensors")):
        safetensors_header(p)
    if (p := path / "tokenizer.json").is_file():
        check_tokenizer(p)
    for p, template in _templates(path):
        check_chat_template(p, template)


def load_error(path, e: BaseException) -> ZooError:
    """One line for an exception out of ``from_pretrained`` on the checked directory ``path``."""
    path = Path(path)
    weights = sorted(path.glob("*.safetensors"))
    where = ", ".join(str(p) for p in weights) or str(path)
    msg = _one_line(e)
    if "mismatch" in msg.lower() or "size" in msg.lower() and "shape" in msg.lower():
        return ZooError(f"checkpoint file {where}: a tensor's size does not match config.json "
                        f"(the checkpoint is for another model size, or damaged){_mismatch(path, weights)}")
    return ZooError(f"model directory '{path}' cannot be loaded: {msg}")


def _mismatch(path: Path, weights: list[Path]) -> str:
    """': <name> is [a] in the file, [b] in the model' for the first mismatched tensor, if found."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path))
        want = {k: list(v.shape) for k, v in model.state_dict().items()}
        for w in weights:
            for name, t in safetensors_header(w).items():
                # checkpoint names may carry another prefix than the model's (transformers renames)
                match = [k for k in want if k == name or k.endswith("." + name) or name.endswith("." + k)]
                if len(match) == 1 and t["shape"] != want[match[0]]:
                    return f": {name} is {t['shape']} in {w.name}, {want[match[0]]} in the model"
    except Exception:  # noqa: BLE001 - only a detail of the message
        pass
    return ""
