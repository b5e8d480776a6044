"""`zoo eval`: accuracy retention of pruning methods on question files, batched, resumable and
data-parallel (``torchrun --nproc-per-node N -m zoocli eval ...``; see
``zoocli.evaluation.distributed``). Parse and validate everything before a model loads, predict
(``zoocli.eval_runner.run_eval``), then rank 0 summarises (``zoocli.evaluation.summary``) and
prints what ``zoocli.render`` builds; the other ranks print nothing but their errors.

A single process appends to ``--out`` directly and rewrites it in the same canonical (sorted)
form at the end, so one process and N give the same file up to timings.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from zoocli.cli.common import (
    MAX_BATCH, MAX_NEW_TOKENS, BudgetsOpt, check_int, ConfigOpt, console, DeviceOpt, DtypeOpt,
    handle_errors, JsonOpt, load_model, MaxNewOpt, method_options, MethodOptions, MethodsOpt, ModelOpt,
    print_json, RandomOpt, split_list, unique, method_key, budget_key, warn,
)
from zoocli.errors import UsageError, ZooError


@dataclass
class EvalPlan:
    """Everything `eval` checked before loading a model."""

    spec: Any  # eval_runner.EvalSpec
    sets: list[tuple[Any, str]]  # (eval_runner.Dataset, path as given)
    out: Path
    temporary: Any = None  # tempfile.TemporaryDirectory when no --out was given
    done: set = field(default_factory=set)
    plan_keys: set = field(default_factory=set)
    inputs: tuple = ()  # the files eval reads (question, answers, --config): --out is none of them


def _datasets(data: list[str] | None, answers: list[str] | None, image_root: str | None,
              outside: bool = False):
    """[(Dataset, path)], validating every file, field and image before a model loads; an image
    path that leaves its root is refused unless ``outside`` (``--allow-outside-root``)."""
    from zoocli.bench import shipped_images
    from zoocli.eval_runner import Dataset
    from zoocli.evaluation import SAMPLE_EVAL, dataset_name, load_samples

    if not data:
        if answers:
            raise UsageError("--answers needs a question file (DATA)")
        root = image_root or str(shipped_images()[0].parent)
        samples = load_samples(SAMPLE_EVAL, image_root=root, allow_outside_root=outside)
        return [(Dataset(dataset_name(SAMPLE_EVAL), samples),
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
        samples = load_samples(p, answers=answers[i] if answers else None, image_root=root,
                               allow_outside_root=outside)
        out.append((Dataset(name, samples), str(p)))
    return out


def _method_plan(methods: str, budgets: str, batch_size: int, max_new_tokens: int,
                 opts: MethodOptions) -> tuple[list[str], list[str], dict[str, Any]]:
    """(method specs without the baseline, budgets, method options), validated."""
    from zoocli.eval_runner import budget_value
    from zoocli.evaluation import BASELINE
    from zoocli.methods import parse_method_spec

    names = [n for n in split_list(methods, "--methods") if n != BASELINE]
    for n in names:
        parse_method_spec(n)  # "zoo" or "zoo:estimator=jvp"
    names = unique(names, "--methods", method_key)
    budget_list = split_list(budgets, "--budgets") if names else []
    for b in budget_list:
        budget_value(b)
    budget_list = unique(budget_list, "--budgets", budget_key)
    check_int("--batch-size", batch_size, 1, MAX_BATCH)
    check_int("--max-new-tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    options = {k: v for k, v in opts.zoo().items() if v is not None}
    return names, budget_list, options


def _output(out: Path | None, world: int) -> tuple[Path, Any]:
    """(--out, the temporary directory holding it when none was given)."""
    tmp = None
    if out is None:
        if world > 1:
            raise UsageError("--out is needed with torchrun (the ranks share it)")
        tmp = tempfile.TemporaryDirectory(prefix="zoo-eval-")
        out = Path(tmp.name) / "eval.jsonl"
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a .jsonl file")
    return out, tmp


def _locked(out: Path, rank: int):
    """Rank 0 holds the advisory lock of --out from before it reads the previous records to the
    end of the run (a second `zoo eval` on the same file is refused, naming this process); the
    other ranks write only their own shard files, each locked while it is open."""
    import contextlib

    from zoocli.outfile import output_lock

    return output_lock(out, "--out") if rank == 0 else contextlib.nullcontext()


def _resume(plan: EvalPlan, rank: int, world: int) -> None:
    """Refuse a --out that is not zoo's records (``notes.txt``, a JSON array: never truncated),
    is one of the inputs, or holds other settings, and (torchrun) a file in this rank's shard
    place that is not its shard; note the predictions already made (--out and the shards a
    torchrun run left). Before the model loads."""
    from zoocli.eval_runner import check_resumable
    from zoocli.evaluation import read_records, zoo_shards
    from zoocli.evaluation.store import KEY_FIELDS, ROW_HEADS, check_shard, record_key
    from zoocli.outfile import check_jsonl, check_target

    check_target(plan.out, "--out", inputs=plan.inputs)
    check_jsonl(plan.out, KEY_FIELDS, ROW_HEADS, "--out")
    if world > 1:
        check_shard(plan.out, rank)

    previous = [p for p in zoo_shards(plan.out) + [plan.out] if p.exists()]
    records = list(read_records(previous, missing_ok=True))  # read once: checked, then keyed
    check_resumable(records, plan.spec, str(plan.out))
    plan.done = {record_key(r) for r in records}
    plan.plan_keys = {(d.name, str(s.id), m, b) for d, _p in plan.sets for s in d.samples
                      for m, b in plan.spec.configs()}


def _predict(plan: EvalPlan, group, load: tuple[str, str, bool], quiet: bool):
    """This rank's missing predictions: (EvalStats with all ranks' totals, meaningless)."""
    from zoocli.cli.progress import Steps
    from zoocli.eval_runner import run_eval, todo_count
    from zoocli.evaluation import RecordWriter

    model, dtype, random_weights = load
    adapter = load_model(model, group.device, dtype, random_weights, quiet=quiet)
    datasets = [d for d, _p in plan.sets]
    where = {"shard": (plan.out, group.rank, group.world)} if group.world > 1 else {"path": plan.out}
    todo = todo_count(datasets, plan.spec, plan.done, group.rank, group.world)
    with Steps("eval", todo, "predictions", rate_unit="samples", disable=quiet,
               log_rate=(0.10, 30.0)) as steps, \
            RecordWriter(**where) as writer:
        if plan.done:
            steps.note(f"eval: {len(plan.done & plan.plan_keys)} predictions already in "
                       f"{plan.out} are kept, {todo} to go")
        stats = run_eval(adapter, datasets, plan.spec, writer, done=plan.done, rank=group.rank,
                         world_size=group.world,
                         progress=lambda k, what: steps.finished(what, n=k))
    stats.predictions, stats.seconds = group.totals(stats.predictions, stats.seconds)
    return stats, bool(adapter.meaningless)


def _run(plan: EvalPlan, rank: int, world: int, local: int, load: tuple[str, str, bool], device: str):
    """Predict on every rank; rank 0 merges the shards. Returns (stats, meaningless) on rank 0,
    None on the others."""
    from zoocli.eval_runner import todo_count
    from zoocli.evaluation.distributed import ProcessGroup, merge_into, rank_device

    group = ProcessGroup(world, rank, local, rank_device(device, world, local))
    group.init()
    try:
        stats, meaningless = None, None
        if todo_count([d for d, _p in plan.sets], plan.spec, plan.done):
            stats, meaningless = _predict(plan, group, load, quiet=rank != 0)
        group.barrier()
        if rank != 0:
            return None
        merge_into(plan.out)
    finally:
        group.close()
    return stats, meaningless


def _report(plan: EvalPlan, stats, meaningless: bool | None, world: int, json_out: bool) -> None:
    """Rank 0: the summary of this plan (records of other plans in --out are left out)."""
    from zoocli import render
    from zoocli.eval_runner import budget_value
    from zoocli.evaluation import BASELINE, MEAN, read_records
    from zoocli.evaluation.summary import CHANCE_NOTE, eval_summary, plan_records, with_throughput

    recs = plan_records(read_records(plan.out, missing_ok=True), plan.plan_keys)
    if meaningless is None:
        meaningless = any(r.get("meaningless") for r in recs)
    rows, metric_rows, tput = eval_summary(recs)
    spec = plan.spec
    run = {"predictions": stats.predictions if stats else 0,
           "resumed": len(plan.plan_keys & plan.done),
           "seconds": round(stats.seconds, 3) if stats else 0.0,
           "samples_per_s": stats.samples_per_s if stats else None,
           "world_size": world, "batch_size": spec.batch_size}
    warnings = stats.warnings if stats else []
    out = None if plan.temporary else str(plan.out)
    if json_out:
        print_json({
            "model": spec.model, "meaningless": meaningless,
            "note": CHANCE_NOTE if meaningless else None,
            "datasets": [{"name": d.name, "path": p, "n": len(d.samples)} for d, p in plan.sets],
            "methods": [BASELINE] + spec.methods, "budgets": [budget_value(b) for b in spec.budgets],
            "settings": spec.settings(), "out": out, "summary": with_throughput(rows, tput),
            "metrics": metric_rows, "run": run, "warnings": warnings,
        })
        return
    for w in warnings:
        warn(w)
    names = [d.name for d, _p in plan.sets]
    for renderable in render.eval_view(rows, names, tput, meaningless, run, str(plan.out), out,
                                       CHANCE_NOTE, MEAN):
        console.print(renderable, highlight=False)


@handle_errors
@method_options()
def eval_command(
    data: Annotated[list[str] | None, typer.Argument(
        help="question files (POPE, LLaVA questions or plain JSONL); default: the shipped sample set")] = None,
    answers: Annotated[list[str] | None, typer.Option(
        "--answers", help="answers file for a LLaVA question file (repeat: one per DATA file, in order)")] = None,
    image_root: Annotated[str | None, typer.Option(
        "--image-root", help="folder the image names are relative to (default: each DATA file's folder)")] = None,
    allow_outside_root: Annotated[bool, typer.Option("--allow-outside-root", help=(
        "read images whose path (absolute, '..', or a symlink) leads outside the image root; "
        "off by default, so a data file cannot make zoo read other files"))] = False,
    model: ModelOpt = "llava-1.5",
    methods: MethodsOpt = "zoo,divprune",
    budgets: BudgetsOpt = "192,128,64",
    batch_size: Annotated[int, typer.Option("--batch-size", help="questions per generate batch")] = 8,
    max_new_tokens: MaxNewOpt = 16,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", random_weights: RandomOpt = False,
    opts: MethodOptions = MethodOptions(),
    out: Annotated[Path | None, typer.Option(
        help="JSON Lines of predictions; rerun with the same file to resume (default: a temporary file)")] = None,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Accuracy retention of each method x budget against the unpruned model on question files."""
    from zoocli.eval_runner import EvalSpec
    from zoocli.evaluation.distributed import dist_env

    rank, world, local = dist_env()
    try:
        names, budget_list, options = _method_plan(methods, budgets, batch_size, max_new_tokens, opts)
        sets = _datasets(data, answers, image_root, allow_outside_root)
        spec = EvalSpec(model=model + (" (random weights)" if random_weights else ""), methods=names,
                        budgets=budget_list, batch_size=batch_size, max_new_tokens=max_new_tokens,
                        seed=opts.seed, options=options, scope=opts.budget_scope)
        plan = EvalPlan(spec, sets, *_output(out, world),
                        inputs=(*(data or ()), *(answers or ()), config))
        with _locked(plan.out, rank):
            _resume(plan, rank, world)
            done = _run(plan, rank, world, local, (model, dtype, random_weights), device)
            if done is not None:
                _report(plan, *done, world, json_out)
        if plan.temporary is not None:
            plan.temporary.cleanup()
        sys.stdout.flush()
    except ZooError as e:
        if world > 1:
            e.args = (f"rank {rank}: {e}",) + tuple(e.args[1:])
        raise
