"""Command-line face of headbench: thin typer commands over :mod:`pipeline`.

Run as ``python cli.py COMMAND`` from the repository root, or as ``headbench COMMAND`` once installed.
Option values are checked by their types and choices here, before any model is built. Exit status: 0 when all is
done, 1 on an error (one line on stderr), 2 on a usage error, 3 when the command finished but some images could
not be read (``extract`` and ``predict``), 130 when interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, List, Optional

import typer

from pipeline.data import RESIZE_RULES
from pipeline.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PARTIAL, HeadbenchError
from pipeline.extract.config import ENGINES, MAPS_DTYPES, ExtractOptions, RayOptions
from pipeline.finetune.train import FinetuneConfig
from pipeline.fit import CLASS_WEIGHTS, FEATURE_KINDS, FitConfig
from pipeline.fit.pick import PICK_RULES
from pipeline.fit.protocol import SELECT_ON
from pipeline.machine import MAX_DECODE_THREADS
from pipeline.reader import PROCESS_MIN_IMAGES, READER_KINDS
from pipeline.runtime.factory import RUNTIME_CHOICES

if TYPE_CHECKING:
    from pipeline.extract import ExtractResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Extract frozen CNN features once, then compare classifier heads in seconds.",
    pretty_exceptions_enable=False,
)


def _choices(name: str, values: tuple[str, ...] | list[str]) -> type[Enum]:
    """An Enum of command-line choices (typer lists them in --help and rejects anything else).

    Each choice list is owned by the pipeline code that checks the value (``RESIZE_RULES``, ``RUNTIME_CHOICES``,
    ...); the command line only mirrors it, so a choice added there is offered here.
    """
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def _registry_names() -> list[str]:
    from pipeline.backbones import list_backbones

    return list_backbones()


def _head_names() -> list[str]:
    from pipeline.fit.heads import HEADS

    return [*HEADS, "all"]


_EX, _RAY, _FIT, _FT = ExtractOptions, RayOptions, FitConfig, FinetuneConfig
"""Each stage's configuration, whose class defaults the options below show: the stages own them."""

Backbone = _choices("Backbone", _registry_names())
Resize = _choices("Resize", RESIZE_RULES)
MapsDtype = _choices("MapsDtype", MAPS_DTYPES)
Runtime = _choices("Runtime", RUNTIME_CHOICES)
Engine = _choices("Engine", ENGINES)
Reader = _choices("Reader", READER_KINDS)
Head = _choices("Head", _head_names())
Features = _choices("Features", FEATURE_KINDS)
ClassWeight = _choices("ClassWeight", CLASS_WEIGHTS)


PickRule = _choices("PickRule", PICK_RULES)
SelectOn = _choices("SelectOn", SELECT_ON)


def _terminate(signum, frame):  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt


def main(args: list[str] | None = None, application: typer.Typer | None = None, quiet_native: bool = True) -> None:
    """Console-script entry point: run the app, turning expected errors into one line on stderr.

    ``args`` (default: the command line), ``application`` (default: :data:`app`) and ``quiet_native`` (filter
    TensorFlow's native stderr chatter; it replaces the process's stderr) are seams for tests.
    """
    import click

    from pipeline.quiet import filter_native_stderr

    if quiet_native:
        filter_native_stderr()  # TensorFlow's native CUDA-probing chatter would drown the tool's own lines
    signal.signal(signal.SIGTERM, _terminate)  # a polite kill stops like Ctrl-C: finished work is committed
    try:
        status = (application or app)(args=args, standalone_mode=False)
    except HeadbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_ERROR)
    except (KeyboardInterrupt, click.exceptions.Abort):  # click turns Ctrl-C inside a command into Abort
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise  # a bug: keep its traceback
        # typer's usage errors (unknown option, a value outside its choices): one line, not a panel
        if type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.format_message())
        else:
            typer.echo(f"error: {exc.format_message()} (see --help)", err=True)
        sys.exit(exc.exit_code)
    if status == EXIT_INTERRUPTED:  # typer turns Ctrl-C (and SIGTERM, via _terminate) into a silent exit 130
        typer.echo("interrupted: rerun the same command to resume", err=True)
    sys.exit(status if isinstance(status, int) else 0)


def _output_file(*suffixes: str):
    """An ``--out`` callback: the file must end in one of ``suffixes`` and its folder must be creatable and
    writable, checked before anything runs (a usage error, exit 2), not after all the work."""
    def check(value: Path | None) -> Path | None:
        if value is None:
            return value
        if value.suffix.lower() not in suffixes:
            raise typer.BadParameter(f"must end in {' or '.join(suffixes)}, got {value.name}")
        if value.is_dir():
            raise typer.BadParameter(f"{value} is a folder; name a file ending in {' or '.join(suffixes)}")
        folder = value.expanduser().resolve().parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise typer.BadParameter(f"cannot write {value}: {folder} is not a writable folder")
        return value

    return check


def _memory_size(value: str | None) -> str | None:
    """Check ``--memory-budget`` before anything runs (a usage error, exit 2, when it is not a size)."""
    if value is not None:
        from pipeline.errors import FitError
        from pipeline.fit.plan import parse_memory

        try:
            parse_memory(value)
        except FitError as exc:
            raise typer.BadParameter(str(exc).removeprefix("--memory-budget ")) from None
    return value


def _positive(value: float) -> float:
    """A usage error (exit 2) for a value that must be above zero."""
    if not value > 0:
        raise typer.BadParameter(f"must be above 0, got {value:g}")
    return value


def _print_table(table) -> None:  # noqa: ANN001 - a rich Table
    """Print a rich table at its full width (a leaderboard is never cropped to the terminal)."""
    from rich.console import Console

    console = Console()
    need = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(width=max(console.width, need)).print(table)


def _check_model_options(backbones: list[str], input_size: int | None, alpha: float | None) -> None:
    """Check ``--input-size`` and ``--alpha`` against every backbone asked for, before anything runs.

    Parameters
    ----------
    backbones : list of str
        Registered backbone names.
    input_size, alpha : optional
        The options as given (None: the backbone's own).

    Raises
    ------
    typer.BadParameter
        A size below a backbone's minimum, or a width multiplier it does not have (a usage error, exit 2).
    """
    from pipeline.backbones import check_options, get_spec
    from pipeline.errors import BackboneError

    for name in backbones:
        try:
            check_options(get_spec(name), input_size, alpha)
        except BackboneError as exc:
            hint = "--alpha" if "alpha" in str(exc) else "--input-size"
            raise typer.BadParameter(str(exc), param_hint=hint) from None


def _print_failures(res: ExtractResult) -> None:
    """Say on stderr which images of one backbone's extraction could not be decoded (the first 20 of them)."""
    if not res.failures:
        return
    typer.echo(f"{len(res.failures)} image(s) could not be decoded (recorded in the cache):", err=True)
    for p, why in res.failures[:20]:
        typer.echo(f"  {p}: {why}", err=True)
    if len(res.failures) > 20:
        typer.echo(f"  ... and {len(res.failures) - 20} more", err=True)


def _command() -> str:
    return " ".join(["python cli.py", *sys.argv[1:]])


# ---- commands (each one calls a single pipeline function) ----------------------------------------------------


@app.command()
def extract(
    data: Annotated[Path, typer.Argument(help="Image folder: DATA/<class>/* or DATA/{train,val,test}/<class>/*.")],
    backbone: Annotated[List[Backbone], typer.Option("--backbone", "-b",  # type: ignore[valid-type]
                                                     help="Registered backbone (repeatable; see `backbones`).")
                        ] = [Backbone(_EX.backbone)],  # noqa: B006 - typer reads the default list
    weights: Annotated[str, typer.Option(help="'imagenet' (Keras cache, else download), a .weights.h5/.h5/.keras "
                                              "file, or 'none' for random weights.")] = _EX.weights,
    cache_dir: Annotated[Path, typer.Option(help="Where feature caches are written.")] = _EX.cache_dir,
    input_size: Annotated[Optional[int], typer.Option(min=1, help="Square input side (default: the backbone's "
                                                                  "own).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Width multiplier (MobileNet v1/v2).")] = None,
    resize: Annotated[Resize, typer.Option(help="crop (centre crop) | squash (stretch) | "  # type: ignore
                                                "pad (letterbox).")] = Resize(_EX.resize),
    maps: Annotated[bool, typer.Option("--maps", help="Also store the last spatial feature maps.")] = False,
    max_pool: Annotated[bool, typer.Option("--max-pool", help="Also store global max pooled vectors.")] = False,
    maps_dtype: Annotated[MapsDtype, typer.Option(help="Storage type of maps.")  # type: ignore[valid-type]
                          ] = MapsDtype(_EX.maps_dtype),
    runtime: Annotated[Runtime, typer.Option(  # type: ignore[valid-type]
        help="Inference runtime: onnx (ONNX Runtime: CPU, or CUDA / TensorRT with onnxruntime-gpu), keras, or auto: "
             "by this machine (onnx with a GPU provider, keras where only TensorFlow sees a GPU or without "
             "onnxruntime, on a CPU the one that timed cheaper for this model here, timed once and kept; the device "
             "line says why). ONNX is checked against Keras on the first batch of "
             "every run and falls back to it if they differ.")] = Runtime(_EX.runtime),
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = _EX.batch_size,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help=f"Decoding workers (default: one per core, at most {MAX_DECODE_THREADS}).")] = None,
    reader: Annotated[Reader, typer.Option(  # type: ignore[valid-type]
        help="Decoding workers: process (each its own interpreter, so decoding scales with cores; a crash in an "
             "image decoder costs that image only), thread, or auto: processes when the model runs on a GPU "
             f"({PROCESS_MIN_IMAGES} images or more, where /dev/shm has room), else threads.")] = Reader(_EX.reader),
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first image that cannot be decoded.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed/--no-retry-failed",
                                               help="Retry images that failed in an earlier run.")] = _EX.retry_failed,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Commit finished rows to disk every N images (a crash "
                                                              "loses at most that much work; a larger "
                                                              "--batch-size is capped at N).")] = _EX.checkpoint_rows,
    engine: Annotated[Engine, typer.Option(help="local (this machine) | ray (a Ray cluster; needs the 'ray' extra, "  # type: ignore
                                                "see docs/scaling.md).")] = Engine(_EX.engine),
    ray_address: Annotated[Optional[str], typer.Option(help="With --engine ray: 'auto' or 'ray://HOST:PORT' joins a "
                                                            "running cluster (default: start a local Ray "
                                                            "instance).")] = None,
    num_workers: Annotated[Optional[int], typer.Option(min=1, help="With --engine ray: model workers (default: one "
                                                                   "per node, or as many as the GPUs allow).")] = None,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="With --engine ray: GPUs reserved by each model "
                                                               "worker.")] = _RAY.gpus_per_worker,
    views: Annotated[Optional[int], typer.Option(min=0, max=64, help="Also cache K augmented views per image (K+1 "
                                                                     "times the model work; 0: none). Default: keep "
                                                                     "what the cache has.")] = None,
    view_kinds: Annotated[Optional[str], typer.Option(help="Kinds of view, comma-separated among flip, crop, rotate, "
                                                           "color (default flip,crop,color; see "
                                                           "pipeline/views.py).")] = None,
    view_seed: Annotated[Optional[int], typer.Option(min=0, help="Seed of the views' random parameters (default 0)."
                                                     )] = None,
) -> None:
    """Run frozen backbones over every image once and cache the features (incremental and resumable)."""
    from pipeline.errors import BackboneError
    from pipeline.extract import extract_all
    from pipeline.views import make_view_spec

    _check_model_options([b.value for b in backbone], input_size, alpha)
    if views is None and (view_kinds is not None or view_seed is not None):
        raise typer.BadParameter("--view-kinds and --view-seed need --views K (augmented views per image)",
                                 param_hint="--views")
    try:
        spec = make_view_spec(views, view_kinds, view_seed or 0) if views is not None else None
    except BackboneError as exc:
        raise typer.BadParameter(str(exc), param_hint="--views / --view-kinds") from None
    ray = RayOptions(address=ray_address, num_workers=num_workers, gpus_per_worker=gpus_per_worker)
    if engine.value == "ray":
        from pipeline.extract.ray_engine import ADDRESS_RE, import_ray

        if ray_address is not None and not ADDRESS_RE.match(ray_address):
            raise typer.BadParameter(f"expected 'auto', 'ray://HOST:PORT' or 'HOST:PORT', got {ray_address!r}",
                                     param_hint="--ray-address")
        import_ray()  # without Ray: one line saying how to install it, before any model is built
    elif ray != RayOptions():
        raise typer.BadParameter("--ray-address, --num-workers and --gpus-per-worker need --engine ray",
                                 param_hint="--engine")
    options = ExtractOptions(weights=weights, input_size=input_size, alpha=alpha, resize=resize.value,
                             maps=maps, max_pool=max_pool, maps_dtype=maps_dtype.value, views=spec,
                             runtime=runtime.value, engine=engine.value, ray=ray, batch_size=batch_size,
                             workers=workers, reader=reader.value, strict=strict, retry_failed=retry_failed,
                             checkpoint_rows=checkpoint_every, cache_dir=cache_dir, command=_command(), quiet=quiet)
    results = extract_all(data, options, [b.value for b in backbone], log=typer.echo, done=_print_failures)
    if any(res.failures for res in results):
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def fit(
    cache_dir: Annotated[Path, typer.Option(help="Folder of feature caches (written by `extract`).")
                         ] = Path(_FIT.cache_dir),
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset to fit when the folder holds several (default: the one extracted last): its name, or its "
             "folder when two share a name.")] = None,
    backbone: Annotated[Optional[List[str]], typer.Option("--backbone", "-b",
                                                          help="Only caches of this backbone (name or label; "
                                                               "repeatable). Default: every cache of the dataset, "
                                                               "compared in one run.")] = None,
    head: Annotated[Optional[List[Head]], typer.Option("--head", help="Head to fit (repeatable), or all (the "  # type: ignore
                                                                       "default).")] = None,
    features: Annotated[Features, typer.Option(help="Cached features: avg | max | maps (spatial maps)."  # type: ignore
                                               )] = Features(_FIT.features),
    class_weight: Annotated[ClassWeight, typer.Option(help="none | balanced (weights classes by inverse "  # type: ignore
                                                           "frequency).")] = ClassWeight(_FIT.class_weight),
    seed: Annotated[int, typer.Option(help="Seed of the automatic split, the folds and every head.")] = _FIT.seed,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: reports/runs/<dataset>_<timestamp>).")
                   ] = None,
    report: Annotated[bool, typer.Option("--report/--no-report",
                                         help="Also write the HTML report (reports/<run name>.html).")] = True,
    memory_budget: Annotated[Optional[str], typer.Option(
        callback=_memory_size, help="Memory the features may take, e.g. 2GB or 500MB (default: half of the "
                                    "machine's memory). Larger features are streamed from the cache.")] = None,
    views: Annotated[bool, typer.Option("--views/--no-views",
                                        help="When the caches hold augmented views (extract --views K), let each "
                                             "head choose none/train/tta/both on the selection split.")
                 ] = _FIT.views,
    pick: Annotated[PickRule, typer.Option(help="How the recommended result is picked from the selection scores: "  # type: ignore
                                                "one_se (within one standard error of the best, the strongest "
                                                "head), one_se_simple (the simplest head within it) or best (the "
                                                "highest score). See docs/protocol.md.")
                    ] = PickRule(_FIT.pick),
    select_on: Annotated[SelectOn, typer.Option(help="Where hyperparameters and the pick are chosen: auto (val "  # type: ignore
                                                     "when a test split exists, else cross-validation on train, so "
                                                     "val stays untouched), cv, or val (then val numbers are "
                                                     "selection scores).")] = SelectOn(_FIT.select_on),
    audit: Annotated[bool, typer.Option("--audit/--no-audit",
                                        help="Audit the images: duplicates, leaks across splits, suspect labels, "
                                             "outliers (audit/ in the run folder; docs/audit.md).")] = _FIT.audit,
    exclude_leaks: Annotated[bool, typer.Option("--exclude-leaks",
                                                help="Take every val/test image with a duplicate in train out of "
                                                     "the final split (recorded in results.json).")
                       ] = _FIT.exclude_leaks,
) -> None:
    """Compare classifier heads on cached features; write a run folder and print a leaderboard."""
    from pipeline.errors import FitError
    from pipeline.fit import run_fit

    try:  # FitConfig owns the options' rules (typer's enums already hold the choices): its refusal is a usage error
        config = FitConfig(cache_dir=cache_dir, dataset=dataset, backbones=backbone,
                           heads=[h.value for h in head] if head else None, features=features.value,
                           class_weight=class_weight.value, seed=seed, out=out, command=_command(),
                           memory_budget=memory_budget, views=views, pick=pick.value, select_on=select_on.value,
                           audit=audit, exclude_leaks=exclude_leaks)
    except FitError as exc:
        raise typer.BadParameter(str(exc)) from None
    run = run_fit(config, log=lambda m: typer.echo(m, err=True))
    html = None
    if report:  # reports/<run name>.html, as `report RUN` writes it; a fault writing it is one line (RunError)
        from pipeline.report import write_report

        html = write_report([run.run_dir])
    _print_table(run.leaderboard())
    typer.echo(f"run folder: {run.run_dir}")
    if html is not None:
        typer.echo(f"report: {html}")


@app.command()
def finetune(
    run: Annotated[Path, typer.Argument(help="Run folder written by `fit`; the fine-tuned model is added to it.")],
    head: Annotated[Optional[str], typer.Option(help="Head to start from: a dense or logreg result key or head name "
                                                     "(default: the run's best of those).")] = None,
    unfreeze: Annotated[Optional[int], typer.Option(min=0, help="Top backbone layers to train (0: the head only; "
                                                                "default: the backbone's last stage, see "
                                                                "pipeline/finetune/train.py).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs (the best on the selection split is kept; early "
                                                    f"stopping after {_FT.patience} without progress).")
                      ] = _FT.epochs,
    learning_rate: Annotated[float, typer.Option(callback=_positive, help="Adam's learning rate (low: the head "
                                                                          "has converged).")] = _FT.learning_rate,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per training step.")] = _FT.batch_size,
    weights: Annotated[Optional[str], typer.Option(help="Backbone weights file if the recorded one moved (must have "
                                                        "the same SHA-256).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of shuffling, augmentation and dropout (default: the "
                                                     "run's seed).")] = None,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help=f"Decoding threads (default: one per core, at most {MAX_DECODE_THREADS}).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (one line per epoch).")] = False,
) -> None:
    """Fine-tune the top of the backbone with a fitted head, from the image files, and add it to the run."""
    from pipeline.finetune import finetune_run
    from pipeline.fit.leaderboard import leaderboard_table

    config = FinetuneConfig(unfreeze=unfreeze, learning_rate=learning_rate, epochs=epochs, batch_size=batch_size,
                            workers=workers, progress=not quiet)
    done = finetune_run(run, head=head, weights=weights, config=config, seed=seed, command=_command(),
                        log=lambda m: typer.echo(m, err=True))
    _print_table(leaderboard_table(done.results))
    e = done.entry
    typer.echo(f"{e['head']}: selection on {e['selection_split']} ({e['cost']['selection_rows']} images), epoch "
               f"{e['params']['best_epoch']} of {e['params']['epochs_run']} kept; fit s is the whole command and "
               f"ms/1k runs from the image files (backbone included); best stays the frozen heads' choice")
    typer.echo(f"{'replaced' if done.replaced else 'added'} {e['key']} in {done.run_dir / 'results.json'} "
               f"({e['fit_seconds']:.0f} s); model {done.run_dir / e['model_file']}")


@app.command()
def backbones() -> None:
    """List the registered backbones: input size, preprocessing, feature shapes, what each is and its CPU cost."""
    from pipeline.backbones import get_spec, list_backbones

    typer.echo("cost: CPU time per image relative to mobilenet_v2, each at its own input size "
               "(bench/backbones.py, docs/benchmarks.md)")
    for name in list_backbones():
        spec = get_spec(name)
        side = spec.map_side
        alphas = f"  alpha {{{', '.join(f'{a:g}' for a in spec.alphas)}}}" if spec.alphas else ""
        maps = f"{side}x{side}x{spec.feature_dim}"
        typer.echo(
            f"{spec.name:<20} {spec.default_input_size}px  pooled {spec.feature_dim:<5} maps {maps:<11} "
            f"cost {spec.cost or '?':<6} {spec.preprocess}{alphas}\n{'':<21}{spec.summary}"
        )


def _field(text: str) -> str:
    """``text`` as one tab-separated field: backslash, tab, newline and carriage return as C escapes."""
    return str(text).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


@app.command()
def report(
    runs: Annotated[List[Path], typer.Argument(help="Run folder(s) written by `fit`; several are compared on one "
                                                    "page.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file to write (default: "
                                                                    "reports/<run>.html).")] = None,
) -> None:
    """Write one self-contained HTML page comparing the heads (and backbones) of one or several fit runs."""
    from pipeline.compare import compare_runs, write_compare
    from pipeline.errors import RunError
    from pipeline.report import default_report_path, write_report

    html = out if out is not None else default_report_path(runs)
    href = None
    if len(runs) > 1:  # several runs: also the paired comparison on their shared images, linked from the page
        try:
            page, _ = write_compare(compare_runs(runs), html.with_name(html.stem + ".compare.html"))
            href = page.name
        except RunError as exc:
            typer.echo(f"note: no compare page: {exc}", err=True)
    problems: list[str] = []
    typer.echo(str(write_report(runs, html, compare_href=href, warn=problems.append)))
    if problems:  # written, but it must not look like a page whose pick can be used
        for line in problems:
            typer.echo(line, err=True)
        raise typer.Exit(EXIT_ERROR)


@app.command()
def compare(
    runs: Annotated[List[Path], typer.Argument(help="Two or more run folders written by `fit`; the first is the "
                                                    "baseline.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file to write; compare.json goes beside "
                                                                    "it (default: reports/<runs>.compare.html).")
                   ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the paired bootstraps.")] = 0,
) -> None:
    """Compare the same results of several runs on the images they share (paired, matched by content)."""
    from pipeline.compare import compare_runs, write_compare
    from pipeline.report import default_report_path

    if len(runs) < 2:
        raise typer.BadParameter("give at least two run folders", param_hint="RUNS")
    html = out if out is not None else default_report_path(runs)
    if out is None:
        html = html.with_name(html.stem + ".compare.html")
    doc = compare_runs(runs, seed=seed)
    page, js = write_compare(doc, html)
    for pair in doc["pairs"]:
        typer.echo(f"{pair['other']} vs {pair['base']}: {pair['shared_images']} shared images"
                   + (f" ({pair['matched_by_digest_only']} matched by content digest only)"
                      if pair["matched_by_digest_only"] else ""))
        for r in pair["rows"]:
            iv = r["delta_interval"]
            typer.echo(f"  {r['key']:<40} {r['base_accuracy']:.3f} -> {r['other_accuracy']:.3f}  "
                       f"{r['delta']:+.3f}" + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "")
                       + f"  p={r['p_holm']:.3g}  {'tied' if r['tied'] else 'different'}")
    typer.echo(f"wrote {page} and {js}")


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder written by `fit`.")],
    images: Annotated[List[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    head: Annotated[Optional[str], typer.Option(help="Head name or result key (default: the run's best).")] = None,
    out: Annotated[Optional[Path], typer.Option(callback=_output_file(".csv", ".json"),
                                                help="Write predictions to a .csv or .json file.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Backbone weights file if the recorded one moved (must have "
                                                        "the same SHA-256).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    runtime: Annotated[Runtime, typer.Option(  # type: ignore[valid-type]
        help="Inference runtime of the backbone: auto (chosen by this machine, as for extract), onnx or keras; the "
             "same labels either way.")] = Runtime("auto"),
    workers: Annotated[Optional[int], typer.Option(
        min=1, help=f"Decoding workers, as for extract (default: one per core, at most {MAX_DECODE_THREADS}).")
                 ] = None,
) -> None:
    """Label new images with a fitted head (same backbone, weights, preprocessing and resize rule as its cache)."""
    from pipeline.predict import predict_images, write_predictions

    # Notes (a download, an ONNX export, a runtime fallback) go to stderr: stdout carries only the predictions.
    rh, rows = predict_images(run, images, head=head, weights=weights, batch_size=batch_size, runtime=runtime.value,
                              log=lambda m: typer.echo(m, err=True), out=out, workers=workers)
    if out is not None:
        typer.echo(f"wrote {write_predictions(rows, rh.class_names, out)} ({len(rows)} images, head {rh.key})")
    else:
        for r in rows:  # one record per line: a tab, newline or backslash in a path is written as its C escape
            path = _field(r["path"])
            typer.echo(f"{path}\t{r['label']}\t{r['probability']:.4f}" if "label" in r
                       else f"{path}\tERROR\t{_field(r['error'])}")
    bad = sum(1 for r in rows if "error" in r)
    if bad:
        typer.echo(f"{bad} of {len(rows)} image(s) could not be decoded", err=True)
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `fit`.")],
    out: Annotated[Path, typer.Option(callback=_output_file(".keras"),
                                      help="Output .keras file (a sidecar .json records classes and input rules).")],
    head: Annotated[str, typer.Option(help="Keras head to export (dense).")] = "dense",
    weights: Annotated[Optional[str], typer.Option(help="Backbone weights file if the recorded one moved.")] = None,
) -> None:
    """Save backbone + dense head as one .keras model that plain Keras loads."""
    from pipeline.predict import export_model

    typer.echo(f"wrote {export_model(run, out, head=head, weights=weights, log=typer.echo)}")


@app.command()
def demo() -> None:
    """Run the whole product on the built-in sample (real faces / non-faces shipped by scikit-image).

    The sample and its cache live in cache/demo/, apart from your own caches.
    """
    from pipeline.demo import run_demo

    out = run_demo(log=typer.echo)
    _print_table(out["fit"].leaderboard())
    typer.echo(f"run folder: {out['run']}")
    if out["report"] is not None:
        typer.echo(f"report: {out['report']}")


if __name__ == "__main__":
    main()
