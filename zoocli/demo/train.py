"""Train the demo model from scratch on the synthetic world: ``python -m zoocli.demo.train``.

The defaults are the shipped recipe (``zoocli/data/demo-llava/TRAINING.json``): run without
arguments it rebuilds the shipped weights into ``--out`` (default: the shipped folder; give another).

Deterministic: the data come from ``--seed`` (training scenes) and ``--heldout-seed`` (held-out
scenes), the weights are initialised from ``--seed``, the thread count is fixed and
``torch.use_deterministic_algorithms`` is on. Each step draws ``--batch`` fresh scenes, encodes each
image once, runs its image prefix through the LLM once and asks the scene's questions from that
key/value cache (``dense_questions``, at most ``--per-type`` per type; loss only on the answer token
and the closing ``</s>``; every answer is one token, ``model.add_world_words``).

What made the difference (issue 14; the earlier recipe stalled at 72%):
- Positions. CLIP's default start puts the patch position embeddings ~50x below what the
  patch embedding of a 28 x 28 x 3 patch puts out, and Adam moves each of that layer's 2,352
  inputs' weights by ~lr a step, so the content grows further; after the pre-LayerNorm the tower
  could not tell where a patch was (a probe learnt a patch's column at chance in 150 steps, an
  object's side at chance in 1,200). Now the position table starts as 2-D sine-cosine
  (``model.init_positions``) and the patch embedding learns at ``--patch-lr`` x the rate.
- Object-level supervision of every visual token (``object_targets``: the class and side of the
  object whose box holds the patch, and one anchor patch per object), next to the per-patch
  colour/kind pixel mix and the scene summary of the mean token (``scene_targets``). The heads
  (``AuxHeads``) are training-only, not in the checkpoint: the shipped model is the plain LLaVA.
  In a vision-only probe these reached 96% kind and 93% side per object token in 450 steps.
- ``--vision-steps``: the first steps train the tower and projector on those targets alone (half
  a step's cost), so that the LLM starts on tokens that already say what is where.
Writes the checkpoint (safetensors + processor/tokenizer files) and ``TRAINING.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from zoocli.adapters.decoder import cache_keyword, language_model
from zoocli.demo import check_new_folder, cli_description, run_cli, world
from zoocli.demo import model as dm

N_CLASSES = 1 + len(world.shape_classes())


class Prompts:
    """Question text -> the prompt ids the adapter builds (chat template, 144 image placeholders)."""

    def __init__(self, processor):
        self.processor, self.cache = processor, {}
        self.blank = world.render([])
        tok = processor.tokenizer
        self.eos = tok.eos_token_id
        self.answer_cache: dict[str, list[int]] = {}
        ids = self.prompt("?")
        self.prefix_len = max(i for i, t in enumerate(ids) if t == processor.image_token_id) + 2  # + "\n"

    def prompt(self, question: str) -> list[int]:
        if question not in self.cache:
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.processor.apply_chat_template(conv, add_generation_prompt=True)
            ids = self.processor(images=self.blank, text=text, return_tensors="pt")["input_ids"][0]
            self.cache[question] = ids.tolist()
        return self.cache[question]

    def answer(self, answer: str) -> list[int]:
        if answer not in self.answer_cache:
            ids = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self.answer_cache[answer] = list(ids) + [self.eos]
        return self.answer_cache[answer]


def dense_questions(shapes, rng, per_type: int = 0) -> list:
    """Training only (``--dense``): every question a scene can answer, rather than one per type:
    the colour of each kind with one shape, each kind's count, each pair's side (where the spec
    asks it), and ``exists`` for every present pair plus as many absent ones (balanced)."""
    out = []
    for kind in world.KINDS:
        same = [s for s in shapes if s.kind == kind]
        if len(same) == 1:
            out.append(world.color_question(kind, same[0].color))
        out.append(world.count_question(kind, len(same)))
    present = sorted({(s.color, s.kind) for s in shapes})
    absent = [ck for ck in world.shape_classes() if ck not in present]
    for (color, kind), ans in [(ck, "yes") for ck in present] + [(ck, "no") for ck in rng.sample(absent, len(present))]:
        out.append(world.exists_question(color, kind, ans))
    out += [world.leftright_question(s) for s in world.leftright_candidates(shapes)]
    if per_type:  # at most ``per_type`` of each type (cheaper steps, same answer balance per type)
        out = [q for t in world.QTYPES for q in _at_most([q for q in out if q.qtype == t], per_type, rng)]
    return out


def _at_most(items: list, k: int, rng) -> list:
    return items if len(items) <= k else rng.sample(items, k)


def dense_scenes(seed: int, per_type: int = 0):
    """``world.scenes(seed)``'s scenes with ``dense_questions``."""
    import random

    rng = random.Random(seed + 1_000_003)
    for shapes, _ in world.scenes(seed):
        yield shapes, dense_questions(shapes, rng, per_type)


def patch_targets(scenes) -> Tensor:
    """[B, 144, C]: per patch, the fraction of its pixels of each class (0 = background)."""
    maps = np.stack([np.asarray(world.label_map(shapes)) for shapes, _ in scenes]).astype(np.int64)
    b, g, p = maps.shape[0], dm.GRID, dm.PATCH
    cells = maps.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b * g * g, p * p)
    offsets = N_CLASSES * np.arange(b * g * g)[:, None]  # one counting pass: class c of cell i -> bin i*C + c
    counts = np.bincount((cells + offsets).ravel(), minlength=b * g * g * N_CLASSES)
    return torch.from_numpy((counts.reshape(b, g * g, N_CLASSES) / (p * p)).astype(np.float32))


def scene_targets(scenes) -> dict[str, Tensor]:
    """Per scene: ``present`` [B, 12] (colour, kind) present; ``count`` [B, 3] shapes per kind
    (0-4); ``color`` [B, 3] the colour of a kind's only shape (0-3), 4 when it has none or several;
    ``side`` [B, 12] 0 absent, 1 left, 2 right of the midline (box centre), 3 several of that pair."""
    classes = world.shape_classes()
    present = torch.zeros(len(scenes), len(classes))
    count = torch.zeros(len(scenes), len(world.KINDS), dtype=torch.long)
    color = torch.full((len(scenes), len(world.KINDS)), len(world.COLORS), dtype=torch.long)
    side = torch.zeros(len(scenes), len(classes), dtype=torch.long)
    colors = list(world.COLORS)
    for b, (shapes, _) in enumerate(scenes):
        for s in shapes:
            c, k = classes.index((s.color, s.kind)), world.KINDS.index(s.kind)
            side[b, c] = 3 if present[b, c] else (1 if s.cx < world.MIDLINE else 2)
            present[b, c] = 1
            count[b, k] += 1
        for k, kind in enumerate(world.KINDS):
            if count[b, k] == 1:
                color[b, k] = colors.index(next(s.color for s in shapes if s.kind == kind))
    return {"present": present, "count": count, "color": color, "side": side}


def object_targets(scenes) -> dict[str, Tensor]:
    """Per patch (row-major 12 x 12), about the object whose box holds the patch centre (boxes are
    8 px apart, so at most one does): ``cls`` [B, 144] 0 none, else 1 + its (colour, kind) index;
    ``side`` [B, 144] 0 none, 1 / 2 its box centre left / right of the midline; ``anchor`` [B, 144]
    1 on the one patch that holds its box centre (every box of side >= 48 holds that patch's centre,
    so each object has exactly one anchor, and counting a kind = counting its anchors)."""
    g, p, classes = dm.GRID, dm.PATCH, world.shape_classes()
    centre = torch.arange(g) * p + p // 2
    cls = torch.zeros(len(scenes), g * g, dtype=torch.long)
    side = torch.zeros(len(scenes), g * g, dtype=torch.long)
    anchor = torch.zeros(len(scenes), g * g)
    for b, (shapes, _) in enumerate(scenes):
        for s in shapes:
            x0, y0, x1, y1 = s.box
            inside = (((centre >= y0) & (centre < y1))[:, None] & ((centre >= x0) & (centre < x1))[None, :]).reshape(-1)
            cls[b, inside] = 1 + classes.index((s.color, s.kind))
            side[b, inside] = 1 if s.cx < world.MIDLINE else 2
            anchor[b, int((y0 + y1) / 2 // p) * g + int(s.cx // p)] = 1
    return {"cls": cls, "side": side, "anchor": anchor}


class AuxHeads(nn.Module):
    """Training-only heads (not in the checkpoint) on the projected visual tokens: per patch, its
    colour/kind pixel mix and its object (``object_targets``: class, side, anchor); from the mean
    over the 144 tokens, the scene summary of ``scene_targets``."""

    def __init__(self, d: int):
        super().__init__()
        n_cls, n_kinds = len(world.shape_classes()), len(world.KINDS)
        self.patch = nn.Linear(d, N_CLASSES)
        self.obj = nn.Linear(d, N_CLASSES)
        self.obj_side = nn.Linear(d, 3)
        self.anchor = nn.Linear(d, 1)
        self.present = nn.Linear(d, n_cls)
        self.count = nn.Linear(d, n_kinds * (world.MAX_SHAPES + 1))
        self.color = nn.Linear(d, n_kinds * (len(world.COLORS) + 1))
        self.side = nn.Linear(d, n_cls * 4)

    def loss(self, feats: Tensor, batch: dict) -> Tensor:
        ce = nn.functional.cross_entropy
        logp = torch.log_softmax(self.patch(feats), dim=-1)
        patch = -(batch["targets"] * logp).sum(-1).mean()
        o = batch["objects"]
        patch = (patch + ce(self.obj(feats).flatten(0, 1), o["cls"].flatten())
                 + ce(self.obj_side(feats).flatten(0, 1), o["side"].flatten())
                 + nn.functional.binary_cross_entropy_with_logits(self.anchor(feats)[..., 0], o["anchor"]))
        g, t = feats.mean(dim=1), batch["scene"]
        b = g.shape[0]
        summary = (nn.functional.binary_cross_entropy_with_logits(self.present(g), t["present"])
                   + ce(self.count(g).view(b * len(world.KINDS), -1), t["count"].view(-1))
                   + ce(self.color(g).view(b * len(world.KINDS), -1), t["color"].view(-1))
                   + ce(self.side(g).view(b * t["side"].shape[1], -1), t["side"].view(-1)))
        return patch + summary


def make_batch(scenes, prompts: Prompts, pad_id: int) -> dict:
    """Tensors for a list of (shapes, questions): one image per scene, one row per question.
    Every prompt starts with the same prefix (``USER: `` + the 144 image placeholders + ``\\n``):
    ``prefix`` [P] holds it once, ``ids`` [R, L] the rest of each row (question, answer, ``</s>``,
    right-padded), ``labels`` [R, L] the next token at answer positions (-100 elsewhere)."""
    rows, img, qtypes = [], [], []
    for i, (_, qs) in enumerate(scenes):
        for q in qs:
            rows.append((prompts.prompt(q.question), prompts.answer(q.answer)))
            img.append(i)
            qtypes.append(q.qtype)
    n_pre = prompts.prefix_len
    prefix = rows[0][0][:n_pre]
    if any(p[:n_pre] != prefix for p, _ in rows):
        raise ValueError("prompts do not share the image prefix")
    length = max(len(p) + len(a) for p, a in rows) - n_pre
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for r, (p, a) in enumerate(rows):
        seq = p[n_pre:] + a
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        labels[r, len(p) - n_pre - 1:len(seq) - 1] = torch.tensor(a)  # position t predicts token t+1
    return {"pv": dm.pixel_values([world.render(s) for s, _ in scenes]), "prefix": torch.tensor(prefix),
            "ids": ids, "mask": mask, "labels": labels, "img": torch.tensor(img), "qtypes": qtypes}


def forward(model, batch: dict, aux_head: AuxHeads | None = None):
    """(answer-token logits [K, V], their labels [K], row of each [K], aux loss or None).
    The image prefix runs through the LLM once per image; its key/value cache is then selected
    per question row (causal attention: the prefix does not see the question, so this is exact)."""
    feats = dm.visual_features(model, batch["pv"])  # [B, 144, D]
    embed = model.get_input_embeddings()
    pre = batch["prefix"][None].expand(feats.shape[0], -1)
    pre_e = embed(pre)
    ph = (pre == model.config.image_token_id)[..., None].expand_as(pre_e)
    pre_e = pre_e.masked_scatter(ph, feats.to(pre_e.dtype))
    lm = language_model(model)
    kw = cache_keyword(type(lm))  # `cache` on newer transformers, `past_key_values` on 5.17 (argument and output)
    cache = getattr(lm(inputs_embeds=pre_e, use_cache=True), kw)
    cache.batch_select_indices(batch["img"])
    n_pre, (r, n) = pre.shape[1], batch["ids"].shape
    mask = torch.cat([torch.ones(r, n_pre, dtype=torch.long), batch["mask"]], dim=1)
    pos = torch.arange(n_pre, n_pre + n)[None].expand(r, -1)
    hidden = lm(inputs_embeds=embed(batch["ids"]), attention_mask=mask, position_ids=pos,
                use_cache=True, **{kw: cache}).last_hidden_state
    sel = batch["labels"] != -100
    logits = model.lm_head(hidden[sel])
    rows = sel.nonzero()[:, 0]
    aux = None
    if aux_head is not None:
        aux = aux_head.loss(feats, batch)
    return logits, batch["labels"][sel], rows, aux


@torch.no_grad()
def answers_correct(model, scenes, prompts: Prompts, pad_id: int, chunk: int = 16) -> list[tuple[str, bool]]:
    """(question type, exact match) per question, in scene-then-question order: right when every
    answer token and ``</s>`` is the argmax (= what greedy decoding produces)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(scenes), chunk):
        batch = make_batch(scenes[i:i + chunk], prompts, pad_id)
        logits, labels, rows, _ = forward(model, batch)
        wrong = torch.zeros(len(batch["qtypes"]), dtype=torch.bool)
        wrong.index_put_((rows,), logits.argmax(-1) != labels, accumulate=True)
        out += [(t, not w) for t, w in zip(batch["qtypes"], wrong.tolist())]
    model.train(was_training)
    return out


def evaluate(model, scenes, prompts: Prompts, pad_id: int) -> dict:
    """Held-out exact match per question type, overall, and the question count ``n``."""
    res = answers_correct(model, scenes, prompts, pad_id)
    out = {t: sum(ok for q, ok in res if q == t) / n
           for t in world.QTYPES if (n := sum(q == t for q, _ in res))}
    out["overall"] = sum(ok for _, ok in res) / len(res)
    out["n"] = len(res)
    return out


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def take(gen, n: int) -> list:
    return [next(gen) for _ in range(n)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m zoocli.demo.train", description=cli_description(__doc__))
    p.add_argument("--seed", type=int, default=0, help="training scenes and weight initialisation")
    p.add_argument("--heldout-seed", type=int, default=1, help="held-out scenes (the shipped eval set uses another)")
    p.add_argument("--heldout", type=int, default=300, help="held-out scenes (~3.7 questions each)")
    p.add_argument("--steps", type=int, default=1600, help="optimizer steps, --vision-steps included")
    p.add_argument("--batch", type=int, default=32, help="scenes per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (5%% warm-up, cosine to 5%%)")
    p.add_argument("--aux", type=float, default=1.0, help="weight of the auxiliary losses (per patch, per object, scene summary)")
    p.add_argument("--patch-lr", type=float, default=0.02,
                   help="learning-rate factor of the patch embedding: Adam moves each of its 2,352 inputs' "
                        "weights by ~lr a step, ~20x the relative change of a 128-input layer, and the "
                        "patch content then drowns the position embeddings")
    p.add_argument("--vision-steps", type=int, default=400,
                   help="the first N of --steps train the vision tower and projector on the auxiliary "
                        "targets alone (about half a step's cost), so that the LLM starts on visual "
                        "tokens that already say what is where")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                   help="train on every question a scene can answer (dense_questions), not one per type")
    p.add_argument("--per-type", type=int, default=4,
                   help="with --dense: at most this many questions of each type per scene (0: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a busy 2-core machine, 2 threads spin and run ~8x slower)")
    p.add_argument("--every", type=int, default=250, help="print a held-out check every N steps (on 64 scenes; not during --vision-steps, when the LLM is untrained)")
    p.add_argument("--init", type=Path, default=None,
                   help="continue from this checkpoint (a --out of an earlier run) instead of fresh weights; "
                        "the optimizer and the auxiliary heads start afresh")
    p.add_argument("--out", type=Path, default=Path("demo-llava-trained"),
                   help="a new or empty folder for the checkpoint and TRAINING.json (the shipped one is "
                        "zoocli/data/demo-llava; compare, do not overwrite)")
    p.add_argument("--snapshot", type=Path, default=None,
                   help="also save the model here at every held-out check (a fallback while training)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "heldout", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.vision_steps < args.steps:
        p.error("--vision-steps must be at least 0 and below --steps")
    if args.per_type < 0 or args.every < 0 or not args.lr > 0 or not args.patch_lr > 0 or args.aux < 0:
        p.error("--per-type, --every and --aux must be >= 0, --lr and --patch-lr > 0")
    if args.init is not None and not (args.init / "config.json").is_file():
        p.error(f"--init {args.init} is not a checkpoint folder (no config.json); give an earlier --out")
    check_new_folder(p, args.out, "--out")
    check_new_folder(p, args.snapshot, "--snapshot")
    return args


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    model, processor = dm.new_model(args.seed) if args.init is None else dm.load(args.init)
    model.train()
    torch.manual_seed(args.seed)
    aux_head = AuxHeads(model.config.text_config.hidden_size)
    prompts, pad = Prompts(processor), processor.tokenizer.pad_token_id
    params = list(model.parameters()) + list(aux_head.parameters())
    patch_w = model.model.vision_tower.embeddings.patch_embedding.weight
    groups = [{"params": [q for q in params if q is not patch_w], "lr_scale": 1.0},
              {"params": [patch_w], "lr_scale": args.patch_lr}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    data = dense_scenes(args.seed, args.per_type) if args.dense else world.scenes(args.seed)
    heldout = take(world.scenes(args.heldout_seed), args.heldout)
    t0, warmup = time.perf_counter(), max(1, args.steps // 20)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = g["lr_scale"] * lr_at(step, args.steps, args.lr, warmup)
        scenes = take(data, args.batch)
        batch = make_batch(scenes, prompts, pad)
        batch["targets"], batch["scene"] = patch_targets(scenes), scene_targets(scenes)
        batch["objects"] = object_targets(scenes)
        if step < args.vision_steps:  # the vision side alone: no LLM pass, no question loss
            aux = aux_head.loss(dm.visual_features(model, batch["pv"]), batch)
            loss, total = torch.zeros(()), aux
        else:
            logits, labels, _, aux = forward(model, batch, aux_head)
            loss = nn.functional.cross_entropy(logits, labels)
            total = loss + args.aux * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            el = time.perf_counter() - t0
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} aux {aux.item():.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {el:.0f}s ({el / (step + 1):.2f} s/step)", flush=True)
        if args.every and (step + 1) % args.every == 0 and args.vision_steps < step + 1 < args.steps:
            acc = evaluate(model, heldout[:64], prompts, pad)
            print("  held-out (64 scenes): " + _fmt(acc), flush=True)
            if args.snapshot is not None:
                dm.save(model, processor, args.snapshot)
    wall = time.perf_counter() - t0
    model.eval()
    acc = evaluate(model, heldout, prompts, pad)
    print(f"held-out ({args.heldout} scenes, {acc['n']} questions): " + _fmt(acc), flush=True)
    return {"model": model, "processor": processor, "accuracy": acc, "train_seconds": round(wall, 1)}


def record(args, result: dict, argv) -> dict:
    return {
        "command": "python -m zoocli.demo.train " + " ".join(argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "python": platform.python_version(),
        "train_wall_seconds": result["train_seconds"],
        "heldout_accuracy_teacher_forced": result["accuracy"],
        "sizes": dm.SIZES, "parameters": sum(p.numel() for p in result["model"].parameters()),
    }


def _fmt(acc: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = train(args)
    args.out.mkdir(parents=True, exist_ok=True)
    dm.save(result["model"], result["processor"], args.out)
    info = record(args, result, argv)
    (args.out / "TRAINING.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
