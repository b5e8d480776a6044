"""`zoo eval`: accuracy retention of pruning methods on question files, batched, resumable and
data-parallel (``torchrun --nproc-per-node N -m zoocli eval ...``).

Registered in ``zoocli.cli`` (``app.command("eval")(eval_command)``). Nothing heavy is imported
at module level: torch and transformers load inside the command.

Data parallel: when torchrun's ``RANK`` / ``WORLD_SIZE`` are set (world size > 1) the process
group is initialised (gloo on CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``); every rank
runs its round-robin share of the samples into its own shard ``run.rankR.jsonl``, then after a
barrier rank 0 merges the shards (and any earlier ``--out``) into ``--out``, deletes the shards
and prints the summary; the other ranks print nothing but their errors. A single process appends
to ``--out`` directly and rewrites it in the same canonical (sorted) form at the end, so the two
give the same file up to timings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from zoocli.cli import ConfigOpt, _split, _zoo_options, handle_errors
from zoocli.errors import UsageError, ZooError

CHANCE_NOTE = ("random weights: the answers carry no meaning, so these scores are at chance level "
               "and say nothing about the methods")


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun), else (0, 1, 0)."""
    def num(name: str, default: int) -> int:
        v = os.environ.get(name)
        try:
            return int(v) if v is not None and v.strip() else default
        except ValueError:
            raise UsageError(f"environment variable {name}={v!r} is not an integer") from None

    world = num("WORLD_SIZE", 1)
    rank = num("RANK", 0)
    local = num("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent")
    return rank, world, local


class _Dist:
    """The process group for a torchrun launch (a no-op for one process)."""

    def __init__(self, world: int, rank: int, local: int, device: str):
        self.world, self.rank, self.local = world, rank, local
        self.device = device
        self.backend = None

    def init(self) -> None:
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        self.backend = "nccl" if self.device.startswith("cuda") else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(self.local)
        if not dist.is_initialized():
            dist.init_process_group(backend=self.backend, rank=self.rank, world_size=self.world)

    def barrier(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local])
        else:
            dist.barrier()

    def totals(self, predictions: int, seconds: float) -> tuple[int, float]:
        """All ranks' predictions summed and the slowest rank's seconds (a collective call)."""
        if self.world == 1:
            return predictions, seconds
        import torch
        import torch.distributed as dist

        dev = f"cuda:{self.local}" if self.backend == "nccl" else "cpu"
        n = torch.tensor([float(predictions)], dtype=torch.float64, device=dev)
        t = torch.tensor([float(seconds)], dtype=torch.float64, device=dev)
        dist.all_reduce(n, op=dist.ReduceOp.SUM)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(n.item()), float(t.item())

    def close(self) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _rank_device(device: str, world: int, local: int) -> str:
    """One GPU per rank under torchrun: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK``."""
    spec = device.strip().lower()
    if world == 1:
        return spec
    if spec == "auto":
        import torch

        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return f"cuda:{local}"
    return spec


def _datasets(data: list[str] | None, answers: list[str] | None, image_root: str | None):
    """[(name, path, samples)], validating every file, field and image before a model loads."""
    from zoocli.eval_runner import Dataset
    from zoocli.evaluation import SAMPLE_EVAL, dataset_name, load_samples

    if not data:
        if answers:
            raise UsageError("--answers needs a question file (DATA)")
        from zoocli.bench import shipped_images

        root = image_root or str(shipped_images()[0].parent)
        return [(Dataset(dataset_name(SAMPLE_EVAL), load_samples(SAMPLE_EVAL, image_root=root)),
                 str(SAMPLE_EVAL))]
    if answers and len(answers) != len(data):
        raise UsageError(f"{len(answers)} --answers files for {len(data)} question files; give one "
                         f"per question file, in the same order")
    out, names = [], {}
    for i, path in enumerate(data):
        p = Path(path)
        name = dataset_name(p)
        if name in names:
            raise UsageError(f"two question files are both named '{name}' ({names[name]} and {path}); "
                             f"rename one")
        names[name] = path
        root = image_root if image_root is not None else str(p.parent)
        samples = load_samples(p, answers=answers[i] if answers else None, image_root=root)
        out.append((Dataset(name, samples), str(p)))
    return out


def _load(model: str, device: str, dtype: str, random_weights: bool, err: Console):
    import transformers

    from zoocli.adapters import load_adapter

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with err.status(f"loading {model}…"):
        return load_adapter(model, device=device, dtype=dtype, random_weights=random_weights)


def _progress(err: Console, disable: bool):
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:.2f} samples/s", style="progress.data.speed")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err,
                    transient=True, disable=disable)


# ------------------------------------------------------------------------------- the summary


def _fmt_budget(b) -> str:
    return "all" if b is None else str(b)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _plan_records(records, plan_keys: set) -> list[dict]:
    from zoocli.evaluation import record_key

    return [r for r in records if record_key(r) in plan_keys]


def _throughput(records: list[dict]) -> dict[tuple, dict]:
    """Per (method, budget): n and samples/s = n / sum(e2e), e2e being each record's own time
    (its encode + selection + its share of the batch's build / prefill / decode)."""
    acc: dict[tuple, list[float]] = {}
    from zoocli.evaluation.store import _budget

    for r in records:
        t = (r.get("timings_ms") or {}).get("e2e")
        acc.setdefault((r["method"], _budget(r["budget"])), []).append(float(t) if t is not None else float("nan"))
    out = {}
    for key, ts in acc.items():
        total = sum(ts)
        out[key] = {"n": len(ts), "samples_per_s": len(ts) / (total / 1e3) if total == total and total > 0 else None}
    return out


def _metrics(records: list[dict]) -> list[dict]:
    """Per dataset x method x budget: n, score, per-kind scores, POPE metrics of the yes/no ones."""
    from zoocli.evaluation.metrics import majority, yes_no_metrics
    from zoocli.evaluation.store import _budget, _sort_key

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["method"], _budget(r["budget"])), []).append(r)
    out = []
    for (d, m, b) in sorted(groups, key=lambda k: (k[0], k[1] != "none", k[1], _sort_key(k[2]))):
        rs = [r for r in groups[(d, m, b)] if r.get("score") is not None]
        row: dict[str, Any] = {"dataset": d, "method": m, "budget": b, "n": len(groups[(d, m, b)]),
                               "score": sum(r["score"] for r in rs) / len(rs) if rs else None}
        kinds: dict[str, list[float]] = {}
        for r in rs:
            kinds.setdefault(r.get("kind") or "vqa", []).append(float(r["score"]))
        row["by_kind"] = {k: {"n": len(v), "score": sum(v) / len(v)} for k, v in sorted(kinds.items())}
        yn = [r for r in rs if r.get("kind") == "yesno" and r.get("answers")]
        if yn:
            row["yesno"] = yes_no_metrics([r.get("extracted") for r in yn], [majority(r["answers"]) for r in yn])
        kept = [r["kept_tokens"] for r in groups[(d, m, b)] if isinstance(r.get("kept_tokens"), int)]
        row["mean_kept_tokens"] = sum(kept) / len(kept) if kept else None
        out.append(row)
    return out


def _table(rows: list[dict], datasets: list[str], tput: dict, meaningless: bool):
    from rich.table import Table

    from zoocli.evaluation import MEAN

    title = "accuracy retention (score %, retention % of the unpruned model)"
    if meaningless:
        title += " — RANDOM WEIGHTS: scores at chance"
    t = Table(title=title, title_justify="left")
    t.add_column("method")
    t.add_column("budget", justify="right")
    for d in datasets:
        t.add_column(f"{d}\nscore", justify="right")
        t.add_column("ret.", justify="right")
    if len(datasets) > 1:
        t.add_column("Avg\nscore", justify="right")
        t.add_column("ret.", justify="right")
    t.add_column("samples/s", justify="right")
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["method"], r["budget"]), {})[r["dataset"]] = r
    for (m, b), per in by.items():
        cells = [m, _fmt_budget(b)]
        cols = datasets + ([MEAN] if len(datasets) > 1 else [])
        for d in cols:
            r = per.get(d)
            cells += ["-", "-"] if r is None else [_pct(r["score"]), _pct(r["retention"])]
        sp = tput.get((m, b), {}).get("samples_per_s")
        cells.append("-" if sp is None else f"{sp:.2f}")
        t.add_row(*cells)
    return t


# ------------------------------------------------------------------------------- the command


@handle_errors
def eval_command(
    data: Annotated[list[str] | None, typer.Argument(
        help="question files (POPE, LLaVA questions or plain JSONL); default: the shipped sample set")] = None,
    answers: Annotated[list[str] | None, typer.Option(
        "--answers", help="answers file for a LLaVA question file (repeat: one per DATA file, in order)")] = None,
    image_root: Annotated[str | None, typer.Option(
        "--image-root", help="folder the image names are relative to (default: each DATA file's folder)")] = None,
    model: Annotated[str, typer.Option("--model", help="alias, offline model, HF id or local dir")] = "llava-1.5",
    methods: Annotated[str, typer.Option(help="comma-separated methods, options as name:key=value (the unpruned baseline always runs)")] = "zoo,divprune",
    budgets: Annotated[str, typer.Option(help="comma-separated budgets: counts (64) or shares (11%)")] = "192,128,64",
    batch_size: Annotated[int, typer.Option("--batch-size", help="questions per generate batch")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="answer length limit")] = 16,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (torchrun: one GPU per rank)")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")] = "auto",
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="full-size architecture of an alias, random weights")] = False,
    m: Annotated[int, typer.Option("--m", "--zoo-m", help=(
        "ZOO: number of random directions (under torchrun write --zoo-m: torchrun's own parser "
        "takes --m for an abbreviation of its options)"))] = 64,
    h: Annotated[float, typer.Option("--h", "--zoo-h", help="ZOO: finite-difference step (--zoo-h under torchrun)")] = 0.01,
    seed: Annotated[int, typer.Option(help="seed of the random directions / random method")] = 0,
    out: Annotated[Path | None, typer.Option(
        help="JSON Lines of predictions; rerun with the same file to resume (default: a temporary file)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON document instead of tables")] = False,
    config: ConfigOpt = None,
) -> None:
    """Accuracy retention of each method x budget against the unpruned model on question files."""
    rank, world, local = _dist_env()
    try:
        _eval(rank, world, local, data=data, answers=answers, image_root=image_root, model=model,
              methods=methods, budgets=budgets, batch_size=batch_size, max_new_tokens=max_new_tokens,
              device=device, dtype=dtype, random_weights=random_weights, m=m, h=h, seed=seed, out=out,
              json_out=json_out)
    except ZooError as e:
        if world > 1:
            e.args = (f"rank {rank}: {e}",) + tuple(e.args[1:])
        raise



def _eval(rank: int, world: int, local: int, *, data, answers, image_root, model, methods, budgets,
          batch_size, max_new_tokens, device, dtype, random_weights, m, h, seed, out, json_out) -> None:
    import sys

    quiet = rank != 0
    console = Console(quiet=quiet)
    err = Console(stderr=True, quiet=quiet)

    # ---- validate everything before loading a model
    from zoocli.eval_runner import EvalSpec, budget_value, check_resumable, run_eval, todo_count
    from zoocli.evaluation import (
        BASELINE, RecordWriter, done_keys, find_shards, merge_shards, read_records, shard_path, summarize,
    )
    from zoocli.methods import parse_method_spec

    names = [n for n in _split(methods, "--methods") if n != BASELINE]
    for n in names:
        parse_method_spec(n)  # "zoo" or "zoo:estimator=jvp"
    names = list(dict.fromkeys(names))
    budget_list = _split(budgets, "--budgets") if names else []
    for b in budget_list:
        try:
            budget_value(b)
        except UsageError as e:
            raise UsageError(str(e).replace("--keep", "--budgets")) from None
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    zoo_opts = _zoo_options(m, h, "fd", None, seed)
    options = {"m": zoo_opts["m"], "h": zoo_opts["h"]}
    sets = _datasets(data, answers, image_root)
    datasets = [d for d, _p in sets]

    tmp = None
    if out is None:
        if world > 1:
            raise UsageError("--out is needed with torchrun (the ranks share it)")
        tmp = tempfile.TemporaryDirectory(prefix="zoo-eval-")
        out = Path(tmp.name) / "eval.jsonl"
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a .jsonl file")

    spec = EvalSpec(model=model + (" (random weights)" if random_weights else ""), methods=names,
                    budgets=budget_list, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
                    options=options)
    previous = [p for p in find_shards(out) + [out] if p.exists()]
    old = list(read_records(previous, missing_ok=True))
    check_resumable(old, spec, str(out))
    done = done_keys(previous)
    del old
    plan_keys = {(d.name, str(s.id), mm, bb) for d in datasets for s in d.samples for mm, bb in spec.configs()}
    todo_all = todo_count(datasets, spec, done)

    dist = _Dist(world, rank, local, _rank_device(device, world, local))
    dist.init()
    try:
        stats = None
        meaningless = None
        if todo_all:
            adapter = _load(model, dist.device, dtype, random_weights, err)
            meaningless = bool(adapter.meaningless)
            target = shard_path(out, rank) if world > 1 else out
            todo = todo_count(datasets, spec, done, rank, world)
            with _progress(err, quiet) as bar, RecordWriter(target) as writer:
                task = bar.add_task("eval", total=todo)
                stats = run_eval(adapter, datasets, spec, writer, done=done, rank=rank, world_size=world,
                                 progress=lambda k, what: bar.update(task, advance=k, description=what))
            stats.predictions, stats.seconds = dist.totals(stats.predictions, stats.seconds)
        dist.barrier()
        if rank != 0:
            return
        shards = find_shards(out)
        if shards or out.exists():
            merge_shards(shards + ([out] if out.exists() else []), out)
            for p in shards:
                p.unlink(missing_ok=True)
    finally:
        dist.close()

    # ---- rank 0: the summary of this plan (records of other plans in --out are left out)
    recs = _plan_records(read_records(out, missing_ok=True), plan_keys)
    if meaningless is None:
        meaningless = any(r.get("meaningless") for r in recs)
    rows = summarize(recs)
    tput = _throughput(recs)
    names_ds = [d.name for d in datasets]
    warnings = stats.warnings if stats else []
    run = {"predictions": stats.predictions if stats else 0,
           "resumed": len(plan_keys & done),
           "seconds": round(stats.seconds, 3) if stats else 0.0,
           "samples_per_s": stats.samples_per_s if stats else None,
           "world_size": world, "batch_size": batch_size}
    if json_out:
        from zoocli.cli import _print_json

        doc = {
            "model": spec.model, "meaningless": meaningless,
            "note": CHANCE_NOTE if meaningless else None,
            "datasets": [{"name": d.name, "path": p, "n": len(d.samples)} for d, p in sets],
            "methods": [BASELINE] + names, "budgets": [budget_value(b) for b in budget_list],
            "settings": spec.settings(), "out": None if tmp else str(out),
            "summary": [{**r, "samples_per_s": tput.get((r["method"], r["budget"]), {}).get("samples_per_s")}
                        for r in rows],
            "metrics": _metrics(recs),
            "run": run, "warnings": warnings,
        }
        _print_json(doc)
    else:
        for w in warnings:
            err.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
        console.print(_table(rows, names_ds, tput, meaningless))
        sp = run["samples_per_s"]
        line = (f"{run['predictions']} predictions in {run['seconds']:.1f} s"
                + (f" ({sp:.2f} samples/s, batch size {batch_size}"
                   + (f", {world} processes" if world > 1 else "") + ")" if sp else "")
                + (f"; {run['resumed']} already in {out}" if run["resumed"] else ""))
        console.print(line, highlight=False)
        if not tmp:
            console.print(f"predictions: {out}", highlight=False)
        if meaningless:
            console.print(f"[bold yellow]{CHANCE_NOTE}[/bold yellow]", highlight=False)
    if tmp is not None:
        tmp.cleanup()
    sys.stdout.flush()
