"""Benchmark question files -> ``Sample`` lists.

Three question-file formats, told apart by the keys of the file's first record:

* POPE (``question_id``, ``image``, ``text``, ``label``): labels inline, yes/no.
* LLaVA question files (``question_id``, ``image``, ``text``[, ``category``]): GQA, TextVQA, the
  LLaVA POPE variant, ... Answers come from a separate ``answers`` file.
* Plain (``image``, ``question``, ``answer`` | ``answers``[, ``choices``][, ``id``]).
  ``answer`` is a string or a list of *alternatives* (any one counts as fully right);
  ``answers`` is a list of independent *human* answers, scored with VQA soft accuracy.
  With ``choices`` the answer is a letter (``"B"``) or one of the choice texts.

Answers files (``load_answers``) are JSON Lines with ``question_id`` and one of ``answer``
(string or list of alternatives), ``answers`` (human answers: strings or VQA-style
``{"answer": ...}`` objects) or ``label`` (POPE), plus optionally ``question`` (or ``text``).
Two whole-file JSON layouts are read too: TextVQA's official ``{"data": [{"image_id", "question",
"answers"}, ...]}`` (keyed by ``image_id``, which is what LLaVA's files call ``question_id``) and
GQA's ``{question_id: {"question", "answer", ...}}``.

Matching questions to answers: by ``question_id`` when ids are unique in both files. When an id
repeats in either file (TextVQA: LLaVA's ``question_id`` is the image id), by
``(question_id, question)``, where the question is the first line of the text, stripped and
lower-cased -- the key LLaVA's ``eval_textvqa.py`` uses. Then every answer line needs its question
text; if a key repeats in the answers file the last line wins (as in LLaVA's dict).

Sample ids are strings: the ``question_id`` (or plain ``id``, else the line number); an id that
repeats within one question file becomes ``"<id>#<k>"`` for its k-th occurrence (k from 1),
skipping any ``k`` whose key is already an id of the file (ids ``1``, ``1``, ``1#1`` become
``1#2``, ``1#3``, ``1#1``), so ids are unique per file and stable while the file is unchanged.

Every problem stops with a ``ZooError`` naming the file, the line number and the field.
"""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zoocli.errors import ZooError

KINDS = ("yesno", "vqa", "mc")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Sample:
    """One question. ``image`` is a path string (joined to ``image_root`` when one was given).

    ``answers`` is None for a question file read without answers. ``kind``: "mc" when there are
    choices, else "yesno" when every answer is yes/no, else "vqa" (also when there are no answers).
    For "mc" the answer is stored as its letter. ``soft``: the answers are independent human
    answers (VQA soft accuracy); otherwise they are alternatives. ``source_id``: the id as written
    in the file (for writing answer files in the benchmark's own format).
    """

    id: str
    image: str
    question: str
    answers: list[str] | None
    kind: str
    choices: list[str] | None = None
    soft: bool = False
    source_id: str | int | None = None
    category: str | None = None
    image_root: str | None = None  # the folder ``image`` must stay inside when it is opened


# --------------------------------------------------------------------------- JSON Lines reading


def _open_text(path: Path) -> str:
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would hang, a device never end
            raise ZooError(f"{_short(path)}: not a regular file (a FIFO, device or socket); give a .jsonl file")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ZooError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ZooError(f"{path}: is a directory, expected a .jsonl file") from None
    except UnicodeDecodeError as e:
        raise ZooError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ZooError(f"{path}: cannot read ({e.strerror})") from None


def _jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number from 1, object) for each non-blank line."""
    text = _open_text(path) if text is None else text
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZooError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ZooError(f"{path}, line {n}: not valid JSON (nested too deeply)") from None
        except ValueError as e:  # an integer over Python's digit limit, ...
            raise ZooError(f"{path}, line {n}: not valid JSON ({_clip(str(e))})") from None
        if not isinstance(obj, dict):
            raise ZooError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def _show(v) -> str:
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (RecursionError, ValueError):  # nested to the limit, a huge integer
        s = f"a {type(v).__name__}"
    return s if len(s) <= 40 else s[:37] + "..."


def _clip(s: str, limit: int = 120) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _short(p, limit: int = 200) -> str:
    """A path for a message: long ones keep their start and end."""
    s = str(p)
    return s if len(s) <= limit else s[:limit // 2] + "..." + s[-(limit // 2):]


def _where(path, n) -> str:
    return f"{path}, line {n}" if isinstance(n, int) else f"{path}, {n}"


def _str(path, n, obj, name, required=True) -> str | None:
    if name not in obj:
        if required:
            raise ZooError(f"{_where(path, n)}: missing field '{name}'")
        return None
    v = obj[name]
    if not isinstance(v, str) or not v.strip():
        raise ZooError(f"{_where(path, n)}: field '{name}' must be a non-empty string, got {_show(v)}")
    return v


def _id(path, n, obj, name, required=True) -> str | int | None:
    if name not in obj:
        if required:
            raise ZooError(f"{_where(path, n)}: missing field '{name}'")
        return None
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, (str, int)) or (isinstance(v, str) and not v.strip()):
        raise ZooError(f"{_where(path, n)}: field '{name}' must be a string or an integer, got {_show(v)}")
    return v


def _str_list(path, n, obj, name, allow_objects=False) -> list[str]:
    """A string or a non-empty list of non-empty strings (or VQA ``{"answer": s}`` objects)."""
    v = obj[name]
    if isinstance(v, str) and v.strip():
        return [v]
    if isinstance(v, list) and v:
        out = []
        for item in v:
            if allow_objects and isinstance(item, dict) and isinstance(item.get("answer"), str):
                item = item["answer"]
            if not isinstance(item, str) or not item.strip():
                break
            out.append(item)
        else:
            return out
    what = "a non-empty string or a non-empty list of non-empty strings"
    raise ZooError(f"{_where(path, n)}: field '{name}' must be {what}, got {_show(v)}")


def _is_yes_no(a: str) -> bool:
    return a.strip().lower().rstrip(".") in ("yes", "no")


def infer_kind(answers: list[str] | None, choices: list[str] | None = None) -> str:
    """"mc" with choices; "yesno" when every answer is yes/no; else "vqa"."""
    if choices:
        return "mc"
    if answers and all(_is_yes_no(a) for a in answers):
        return "yesno"
    return "vqa"


def question_key(text: str) -> str:
    """The question part of a prompt for matching: first line, stripped, lower-cased."""
    return text.strip().split("\n", 1)[0].strip().lower()


# --------------------------------------------------------------------------- answers files


@dataclass
class _Answer:
    qid: str
    question: str | None  # question_key(...) or None
    answers: list[str]
    soft: bool
    where: str | int  # line number or "entry ..."


def _answers_from_line(path, n, obj) -> _Answer:
    qid = _id(path, n, obj, "question_id")
    present = [k for k in ("answer", "answers", "label") if k in obj]
    if not present:
        raise ZooError(f"{_where(path, n)}: missing field 'answer' (or 'answers' / 'label')")
    if len(present) > 1:
        raise ZooError(f"{_where(path, n)}: has both '{present[0]}' and '{present[1]}'; keep one")
    key = present[0]
    if key == "label":
        answers, soft = [_str(path, n, obj, "label")], False
    else:
        answers = _str_list(path, n, obj, key, allow_objects=(key == "answers"))
        soft = key == "answers" and len(answers) > 1
    q = _str(path, n, obj, "question", required=False) if "question" in obj else \
        _str(path, n, obj, "text", required=False)
    return _Answer(str(qid), question_key(q) if q else None, answers, soft, n)


def load_answers(path) -> list[_Answer]:
    """Read an answers file (see the module docstring for the layouts)."""
    path = Path(path)
    text = _open_text(path)
    if text.lstrip().startswith("{"):  # maybe one JSON document (often a single line)
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):  # then read as JSON Lines, which names the line
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("data"), list):  # TextVQA official
            out = []
            for i, e in enumerate(whole["data"]):
                where = f"data[{i}]"
                if not isinstance(e, dict):
                    raise ZooError(f"{path}, {where}: expected a JSON object")
                qid = _id(path, where, e, "image_id")
                q = _str(path, where, e, "question")
                answers = _str_list(path, where, e, "answers", allow_objects=True) if "answers" in e else None
                if answers is None:
                    raise ZooError(f"{path}, {where}: missing field 'answers'")
                out.append(_Answer(str(qid), question_key(q), answers, len(answers) > 1, where))
            return out
        if isinstance(whole, dict) and whole and all(isinstance(v, dict) and "answer" in v
                                                     for v in whole.values()):  # GQA official
            out = []
            for qid, e in whole.items():
                where = f"entry '{_clip(qid, 40)}'"
                answers = [_str(path, where, e, "answer")]
                q = _str(path, where, e, "question", required=False)
                out.append(_Answer(str(qid), question_key(q) if q else None, answers, False, where))
            return out
    out = [_answers_from_line(path, n, obj) for n, obj in _jsonl(path, text)]
    if not out:
        raise ZooError(f"{path}: no answers in the file")
    return out


# --------------------------------------------------------------------------- question files

_FORMATS = {
    "pope": "POPE (question_id, image, text, label)",
    "llava": "LLaVA questions (question_id, image, text[, category]) with a separate answers file",
    "plain": "plain (image, question, answer)",
}


def detect_format(keys) -> str | None:
    keys = set(keys)
    if {"text", "label"} <= keys:
        return "pope"
    if "question" in keys and "text" not in keys:
        return "plain"
    if "text" in keys and "question_id" in keys:
        return "llava"
    return None


def _image(path, n, obj, image_root: Path | None, allow_outside: bool = False) -> str:
    """The image path joined to ``image_root``; it must resolve (after symlinks) inside the root
    unless ``allow_outside``, and be an existing regular file."""
    rel = _str(path, n, obj, "image")
    if image_root is None:
        return rel
    if "\0" in rel:
        raise ZooError(f"{path}, line {n}: field 'image' contains a NUL character")
    full = image_root / rel
    if not allow_outside:
        real, root = os.path.realpath(full), os.path.realpath(image_root)
        if os.path.commonpath([real, root]) != root:
            raise ZooError(f"{path}, line {n}: field 'image': {_show(rel)} is outside the image folder "
                           f"{_short(image_root)} (after symlinks); images must be inside it "
                           f"(zoo eval --allow-outside-root reads them anyway)")
    if not os.path.isfile(full):  # False for a FIFO / device, a name too long, a loop of links
        raise ZooError(f"{path}, line {n}: field 'image': no such image file {_short(full)}")
    return str(full)


def _mc_gold(path, n, answers: list[str], choices: list[str]) -> list[str]:
    letters = LETTERS[: len(choices)]
    out = []
    for a in answers:
        s = a.strip()
        core = s.strip("().").strip()
        if len(core) == 1 and core.upper() in letters:
            out.append(core.upper())
            continue
        hits = [letters[i] for i, c in enumerate(choices) if c.strip().lower() == s.lower()]
        if not hits:
            raise ZooError(f"{path}, line {n}: field 'answer': {_show(a)} is neither a letter "
                           f"{letters[0]}-{letters[-1]} nor one of the choices")
        out.append(hits[0])
    return out


def load_samples(path, answers=None, image_root=None, allow_outside_root: bool = False) -> list[Sample]:
    """Read a question file (POPE, LLaVA questions + ``answers`` file, or plain JSONL).

    ``image_root``: a folder; each image is then checked to exist and ``Sample.image`` is the
    joined path. Without it ``Sample.image`` is the file's string as written. An image that
    resolves outside ``image_root`` after symlinks (``../x.jpg``, an absolute path, a link out) is
    refused with its line number unless ``allow_outside_root``.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else None
    if root is not None and not root.is_dir():
        raise ZooError(f"image folder {root} does not exist")
    rows, fmt = _rows_and_format(path, answers)
    row = _plain_row if fmt == "plain" else _question_row
    raw = [row(path, n, obj, fmt, root, allow_outside_root) for n, obj in rows]
    if answers is not None:
        _attach_answers(path, raw, Path(answers))
    return _samples(raw, None if root is None or allow_outside_root else str(root))


def _rows_and_format(path: Path, answers) -> tuple[list, str]:
    """The file's (line number, object) rows and its format (from the first row's keys)."""
    rows = list(_jsonl(path))
    if not rows:
        raise ZooError(f"{path}: no questions in the file")
    n0, first = rows[0]
    fmt = detect_format(first)
    if fmt is None:
        raise ZooError(f"{path}, line {n0}: cannot tell the format from the keys "
                       f"{', '.join(sorted(first)) or '(none)'}; expected one of: "
                       + "; ".join(_FORMATS.values()))
    if answers is not None and fmt != "llava":
        raise ZooError(f"{path}: this {_FORMATS[fmt]} file has its answers inline; "
                       f"an answers file is only for LLaVA question files")
    return rows, fmt


def _new_row(n: int) -> dict:
    return {"n": n, "category": None, "choices": None, "soft": False, "answers": None}


def _plain_row(path: Path, n: int, obj: dict, fmt: str, root, allow_outside_root: bool) -> dict:
    """One row of a plain JSONL file: id, image, question, answer(s), optional choices."""
    r = _new_row(n)
    r["sid"] = _id(path, n, obj, "id", required=False)
    if r["sid"] is None:
        r["sid"] = _id(path, n, obj, "question_id", required=False)
    if r["sid"] is None:
        r["sid"] = n
    r["image"] = _image(path, n, obj, root, allow_outside_root)
    r["question"] = _str(path, n, obj, "question")
    if "answer" in obj and "answers" in obj:
        raise ZooError(f"{path}, line {n}: has both 'answer' and 'answers'; keep one")
    if "answer" in obj:
        r["answers"] = _str_list(path, n, obj, "answer")
    elif "answers" in obj:
        r["answers"] = _str_list(path, n, obj, "answers", allow_objects=True)
        r["soft"] = len(r["answers"]) > 1
    else:
        raise ZooError(f"{path}, line {n}: missing field 'answer'")
    if "choices" in obj:
        ch = obj["choices"]
        if not (isinstance(ch, list) and len(ch) >= 2 and len(ch) <= len(LETTERS)
                and all(isinstance(c, str) and c.strip() for c in ch)):
            raise ZooError(f"{path}, line {n}: field 'choices' must be a list of 2-26 "
                           f"non-empty strings, got {_show(ch)}")
        r["choices"] = list(ch)
        r["answers"] = _mc_gold(path, n, r["answers"], ch)
    return r


def _question_row(path: Path, n: int, obj: dict, fmt: str, root, allow_outside_root: bool) -> dict:
    """One row of a POPE file (gold ``label``) or a LLaVA question file (answers apart)."""
    r = _new_row(n)
    r["sid"] = _id(path, n, obj, "question_id")
    r["image"] = _image(path, n, obj, root, allow_outside_root)
    r["question"] = _str(path, n, obj, "text")
    if "category" in obj:
        r["category"] = _str(path, n, obj, "category")
    if fmt == "pope":
        label = _str(path, n, obj, "label")
        if not _is_yes_no(label):
            raise ZooError(f"{path}, line {n}: field 'label' must be \"yes\" or \"no\", "
                           f"got {_show(label)}")
        r["answers"] = [label.strip().lower().rstrip(".")]
    return r


def _samples(raw: list[dict], image_root: str | None = None) -> list[Sample]:
    """``Sample``s in file order; a repeated id gets ``#1``, ``#2``... skipping suffixed keys that
    are taken (``source_id`` keeps the id as written): the ids are unique."""
    counts = Counter(str(r["sid"]) for r in raw)
    taken = {sid for sid, c in counts.items() if c == 1}  # ids that keep their own spelling
    seen: Counter = Counter()
    out = []
    for r in raw:
        sid = str(r["sid"])
        uid = sid
        if counts[sid] > 1:
            while True:
                seen[sid] += 1
                uid = f"{sid}#{seen[sid]}"
                if uid not in taken:
                    break
            taken.add(uid)
        out.append(Sample(id=uid, image=r["image"], question=r["question"], answers=r["answers"],
                          kind=infer_kind(r["answers"], r["choices"]), choices=r["choices"],
                          soft=r["soft"], source_id=r["sid"], category=r["category"],
                          image_root=image_root))
    return out


def _attach_answers(qpath: Path, raw: list[dict], apath: Path) -> None:
    table = load_answers(apath)
    q_repeats = any(c > 1 for c in Counter(str(r["sid"]) for r in raw).values())
    a_repeats = any(c > 1 for c in Counter(a.qid for a in table).values())
    by_text = q_repeats or a_repeats
    index: dict = {}
    for a in table:
        if by_text:
            if a.question is None:
                raise ZooError(f"{_where(apath, a.where)}: question_id {a.qid} repeats (in the "
                               f"questions or the answers), so answers are matched by "
                               f"(question_id, question) and this entry needs a 'question' field")
            index[(a.qid, a.question)] = a  # the last one wins, as in LLaVA's eval_textvqa
        else:
            index[a.qid] = a
    for r in raw:
        key = (str(r["sid"]), question_key(r["question"])) if by_text else str(r["sid"])
        a = index.get(key)
        if a is None:
            how = f"question_id {r['sid']!r} and question {key[1]!r}" if by_text else \
                f"question_id {r['sid']!r}"
            raise ZooError(f"{qpath}, line {r['n']}: no answer with {how} in {apath}")
        r["answers"], r["soft"] = list(a.answers), a.soft
