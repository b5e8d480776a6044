"""Checks of a local checkpoint directory, so that every failure to load one is one line naming the
file at fault and what is wrong (transformers' own errors are tracebacks, or name no file).

``check_checkpoint_dir(path)`` runs before transformers reads the directory: every ``*.json`` must
be a JSON document of sane depth (``config.json`` nested 200k deep is a ``RecursionError`` inside
transformers), every ``*.safetensors`` must have a well-formed header whose tensors lie inside the
file (a truncated, random or huge-header file), ``tokenizer.json`` must load in ``tokenizers``, and
the chat template must compile and render a probe conversation in transformers' Jinja sandbox.
``load_error(path, e)`` turns what still fails inside ``from_pretrained`` (e.g. a tensor whose
size does not match ``config.json``) into one line naming the weights file.

Every file is opened only when it is a regular file (a FIFO named ``tokenizer.json`` would block
transformers for ever, a link to ``/dev/zero`` would be read until memory runs out) and read only
up to a size cap (``MAX_TEXT_BYTES``, ``MAX_TEMPLATE_BYTES``); weights are safetensors only (an
index pointing at a pickle ``.bin`` is refused: nothing is unpickled); ``config.json``'s fields that
index into other parts of the model (``vision_feature_layer``, the image token id, anyres
pinpoints) are checked against them; a chat template is rendered with a time bound
(``TEMPLATE_SECONDS``) and must print the question.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from zoocli.errors import ZooError

MAX_HEADER = 100_000_000  # the safetensors library's own limit on the header size
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
PROBE_TEXT = "What is this?"
PROBE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_TEXT}]}]
# Size caps of what zoo (and transformers after it) reads from a checkpoint: the largest real
# tokenizer.json files are tens of MB, chat templates a few KB.
MAX_TEXT_BYTES = 128 << 20  # *.json, *.txt (merges), *.model / *.tiktoken (tokenizers)
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template (a *.jinja file or a JSON string)
TEMPLATE_SECONDS = 5.0  # a real template renders in milliseconds; a hostile one is stopped
TEXT_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".gguf")


def _one_line(e: BaseException, limit: int = 200) -> str:
    s = " ".join(str(e).split()) or type(e).__name__
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _bad(path: Path, what: str) -> ZooError:
    return ZooError(f"checkpoint file {path}: {what}")


def check_regular(path: Path, what: str = "checkpoint file") -> int:
    """The size of ``path`` (after symlinks) when it is a regular file; ``ZooError`` naming it
    otherwise (a FIFO, device, socket or directory is never opened)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
        raise ZooError(f"{what} {path}: not a regular file ({kind}); zoo reads only regular files")
    return st.st_size


@contextmanager
def open_regular(path: Path, what: str = "checkpoint file"):
    """``path`` opened for binary reading, only if it is a regular file (checked on the open file
    descriptor too, opened non-blocking: a file swapped for a FIFO in between cannot block)."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ZooError(f"{what} {path}: not a regular file; zoo reads only regular files")
    with os.fdopen(fd, "rb") as f:
        yield f


def read_capped(path: Path, cap: int, what: str = "checkpoint file") -> bytes:
    """The bytes of regular file ``path``; ``ZooError`` naming it when it holds more than ``cap``."""
    try:
        with open_regular(path, what) as f:
            data = f.read(cap + 1)
    except OSError as e:
        raise ZooError(f"{what} {path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if len(data) > cap:
        raise ZooError(f"{what} {path}: over {cap:,} bytes, far more than a file of its kind holds; "
                       "refused (not read)")
    return data


def read_json(path: Path):
    """The JSON document in ``path``; ``ZooError`` naming the file for anything unreadable."""
    data = read_capped(path, MAX_TEXT_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
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
        size = check_regular(path)
        with open_regular(path) as f:
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

    data = read_capped(path, MAX_TEXT_BYTES)
    try:
        Tokenizer.from_str(data.decode("utf-8", "replace"))
    except Exception as e:  # tokenizers raises plain Exception
        raise _bad(path, f"not a tokenizer the tokenizers library can load ({_one_line(e, 120)})") from None


class TooSlow(BaseException):
    """A bounded step (a chat template's rendering) ran out of time. A ``BaseException``, so that
    no ``except Exception`` inside the library code it interrupts swallows it."""


@contextmanager
def time_limit(seconds: float):
    """Raise ``TooSlow`` in the block after ``seconds`` (a real-time interval timer; only in the
    main thread, where Python runs signal handlers: elsewhere the block runs unbounded). An
    interval timer set before is restored with what was left of it."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TooSlow

    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    left, interval = signal.setitimer(signal.ITIMER_REAL, seconds)  # a timer already set (pytest-timeout...)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
        if left > 0:  # give the earlier timer back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - start), 1e-3), interval)


def render_template(template: str, conversation: list, seconds: float = TEMPLATE_SECONDS) -> str:
    """``template`` rendered in transformers' Jinja sandbox for ``conversation`` with a generation
    prompt, stopped after ``seconds`` (``TooSlow``)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    with time_limit(seconds):
        out = render_jinja_template(conversations=[conversation], chat_template=template,
                                    add_generation_prompt=True)
    return out[0][0] if isinstance(out, tuple) else out


def check_chat_template(path: Path, template: str, prompt: bool = True) -> None:
    """Compile and render ``template`` with a probe conversation in transformers' Jinja sandbox,
    within ``TEMPLATE_SECONDS``; with ``prompt`` (a template zoo builds its prompts with) the
    question must come out."""
    from jinja2.exceptions import TemplateError

    if not template.strip():
        raise _bad(path, "its chat template is empty")
    if len(template.encode("utf-8", "replace")) > MAX_TEMPLATE_BYTES:
        raise _bad(path, f"its chat template is over {MAX_TEMPLATE_BYTES:,} bytes; refused")
    try:
        text = render_template(template, PROBE)
    except TooSlow:
        raise _bad(path, f"its chat template did not finish rendering a one-line question in "
                         f"{TEMPLATE_SECONDS:g} s; refused") from None
    except TemplateError as e:
        raise _bad(path, f"its chat template is refused by the Jinja sandbox ({type(e).__name__}: "
                         f"{_one_line(e, 120)})") from None
    except MemoryError:
        raise _bad(path, "its chat template ran out of memory rendering a one-line question") from None
    except Exception as e:  # noqa: BLE001 - a template may raise anything while rendering
        raise _bad(path, f"its chat template fails on a plain conversation ({_one_line(e, 120)})") from None
    if isinstance(text, str) and len(text) > MAX_TEMPLATE_BYTES:
        raise _bad(path, f"its chat template renders {len(text):,} characters for a one-line question; refused")
    if prompt and (not isinstance(text, str) or PROBE_TEXT not in text):
        raise _bad(path, "its chat template does not print the user's question (a probe question "
                         "did not come out in the prompt)")


def _templates(path: Path):
    """(file, template, prompt) for each chat template saved in the directory; ``prompt``: one the
    processor builds zoo's prompts with (not the tokenizer's own or an extra named one)."""
    jinja = [path / "chat_template.jinja"]
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        jinja += sorted(extra.glob("*.jinja"))
    for p in jinja:
        if p.exists() or p.is_symlink():
            data = read_capped(p, MAX_TEMPLATE_BYTES)
            try:
                yield p, data.decode("utf-8"), p.parent == path
            except UnicodeDecodeError as e:
                raise _bad(p, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        p = path / name
        if p.is_file() and isinstance(doc := read_json(p), dict) and "chat_template" in doc:
            t = doc["chat_template"]
            prompt = name != "tokenizer_config.json"
            if isinstance(t, str):
                yield p, t, prompt
            elif isinstance(t, list):  # named templates: [{"name": ..., "template": ...}]
                for item in t:
                    if not (isinstance(item, dict) and isinstance(item.get("template"), str)):
                        raise _bad(p, "field 'chat_template': a list entry is not {name, template}")
                    yield p, item["template"], prompt and item.get("name") == "default"
            elif t is not None:
                raise _bad(p, f"field 'chat_template' is a {type(t).__name__}, not a template string")


def _entries(path: Path):
    """The files of the directory that transformers may read (top level and
    ``additional_chat_templates``), as paths; directories left out."""
    for folder in (path, path / "additional_chat_templates"):
        if folder is not path and not folder.is_dir():
            continue
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise ZooError(f"model directory '{folder}' cannot be listed ({e.strerror})") from None
        for name in names:
            p = folder / name
            if not p.is_dir():
                yield p


def check_files(path: Path) -> None:
    """Every file of the checkpoint is a regular file of bounded size where it is text."""
    for p in _entries(path):
        if p.is_symlink() and not p.exists():
            if p.suffix in TEXT_SUFFIXES + WEIGHT_SUFFIXES:
                raise _bad(p, "a broken symbolic link")
            continue
        size = check_regular(p)
        if p.suffix in TEXT_SUFFIXES:
            cap = MAX_TEMPLATE_BYTES if p.suffix == ".jinja" else MAX_TEXT_BYTES
            if size > cap:
                raise _bad(p, f"{size:,} bytes, over the limit of {cap:,} for a {p.suffix} file "
                              "of a checkpoint; refused (not read)")


def check_weights(path: Path) -> list[Path]:
    """The safetensors files the checkpoint loads (an index's shards, else ``*.safetensors``);
    pickle weights are refused, never opened."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    files = sorted(path.glob("*.safetensors"))
    for ix in indexes:
        doc = read_json(ix)
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise _bad(ix, "field 'weight_map' is missing or not a table of tensor names to files")
        for tensor, fname in wm.items():
            where = f"field 'weight_map' entry '{str(tensor)[:80]}'"
            if not isinstance(fname, str) or not fname or "/" in fname or "\\" in fname or fname in (".", ".."):
                raise _bad(ix, f"{where} is not a file name in the directory ({str(fname)[:80]!r})")
            if not fname.endswith(".safetensors"):
                raise _bad(ix, f"{where} points at {fname[:80]}, not a .safetensors file; zoo loads only "
                               "safetensors weights (pickle files such as .bin are never unpickled)")
            if not (path / fname).exists():
                raise _bad(ix, f"{where} points at {fname[:80]}, which is missing")
    return files


def require_weights(path) -> None:
    """``ZooError`` when the directory holds no safetensors weights (none at all, or only pickle
    files, which zoo never opens)."""
    path = Path(path)
    if sorted(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if pickles:
        raise ZooError(f"model directory '{path}' has weights only in {', '.join(pickles[:3])}; zoo loads "
                       "only safetensors weights (pickle files are never unpickled): convert them first")
    raise ZooError(f"model directory '{path}' has no weights (no *.safetensors file)")


def _vocab(cfg: dict) -> int | None:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    v = text.get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(path: Path, cfg: dict) -> None:
    """The fields of ``config.json`` that index into other parts of the model, checked against
    them (each failure names the file and the field)."""
    f = path / "config.json"
    vocab = _vocab(cfg)
    for key in ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                "vision_start_token_id", "vision_end_token_id"):
        v = cfg.get(key)
        if v is None:
            continue
        if not _is_int(v):
            raise _bad(f, f"field '{key}' is {str(v)[:40]!r}, not a token id")
        if vocab is not None and not 0 <= v < vocab:
            raise _bad(f, f"field '{key}' is {v}, outside the vocabulary (vocab_size {vocab})")
    vc = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
    layers = vc.get("num_hidden_layers")
    if "vision_feature_layer" in cfg and cfg["vision_feature_layer"] is not None:
        v = cfg["vision_feature_layer"]
        vals = v if isinstance(v, list) else [v]
        if not vals or not all(_is_int(x) for x in vals):
            raise _bad(f, f"field 'vision_feature_layer' is {str(v)[:60]!r}, not a layer index or a list of them")
        if _is_int(layers):
            bad = [x for x in vals if not -(layers + 1) <= x <= layers]
            if bad:
                raise _bad(f, f"field 'vision_feature_layer' is {v}: layer {bad[0]} is out of range (the vision "
                              f"tower has {layers} layers: {-(layers + 1)} to {layers})")
    tile = vc.get("image_size")
    check_pinpoints(f, "image_grid_pinpoints", cfg.get("image_grid_pinpoints"), tile)


def check_pinpoints(f: Path, key: str, pins, tile) -> None:
    """Anyres pinpoints: [height, width] pairs of positive multiples of the tile size."""
    if pins is None:
        return
    if not isinstance(pins, list) or not pins or len(pins) > 10_000:
        raise _bad(f, f"field '{key}' is not a list of [height, width] pairs")
    for pin in pins:
        if not (isinstance(pin, list) and len(pin) == 2 and all(_is_int(x) and x > 0 for x in pin)):
            raise _bad(f, f"field '{key}': entry {str(pin)[:40]} is not a [height, width] pair of positive sizes")
        if _is_int(tile) and tile > 0 and any(x % tile for x in pin):
            raise _bad(f, f"field '{key}': entry {pin} does not fit the {tile}-pixel tiles of the vision "
                          "tower (each side must be a multiple of it)")


def check_processor_pinpoints(path: Path, cfg: dict) -> None:
    vc = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        p = path / name
        if not p.is_file():
            continue
        doc = read_json(p)
        for d in (doc, doc.get("image_processor") if isinstance(doc, dict) else None):
            if isinstance(d, dict) and "image_grid_pinpoints" in d:
                check_pinpoints(p, "image_grid_pinpoints", d["image_grid_pinpoints"], vc.get("image_size"))


def check_checkpoint_dir(path) -> None:
    """``ZooError`` (one line, naming the file) for a broken file of a local checkpoint."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ZooError(f"model directory '{path}' has no config.json")
    check_files(path)
    for p in sorted(path.glob("*.json")):
        read_json(p)
    cfg = read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise _bad(path / "config.json", "not a JSON object")
    check_config(path, cfg)
    check_processor_pinpoints(path, cfg)
    for p in check_weights(path):
        safetensors_header(p)
    if (p := path / "tokenizer.json").exists():
        check_tokenizer(p)
    for p, template, prompt in _templates(path):
        check_chat_template(p, template, prompt)


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
