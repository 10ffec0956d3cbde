"""Command-line face of headbench: thin typer commands over :mod:`pipeline`.

Run as ``python cli.py COMMAND`` from the repository root, or as ``headbench COMMAND`` once installed.
Expected failures print one line to stderr and exit with status 1.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import HeadbenchError

# TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) drowns the tool's own lines; users can still
# set TF_CPP_MIN_LOG_LEVEL=0 to see it. The device in use is reported by the extract command itself.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Extract frozen CNN features once, then compare classifier heads in seconds.",
    pretty_exceptions_enable=False,
)


def _terminate(signum, frame):  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point: run the app, turning expected errors into one line on stderr."""
    signal.signal(signal.SIGTERM, _terminate)  # a polite kill stops like Ctrl-C: finished work is committed
    try:
        app()
    except HeadbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


# ---- commands (each one calls a single pipeline function) ----------------------------------------------------


@app.command()
def fit(
    cache_dir: Path = typer.Option(Path("cache"), help="Folder of feature caches (written by `extract`)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset to fit when the folder holds several."),
    backbone: Optional[List[str]] = typer.Option(None, "--backbone", "-b",
                                                 help="Only caches of this backbone (name or label; repeatable). "
                                                      "Default: every cache of the dataset, compared in one run."),
    head: Optional[List[str]] = typer.Option(None, "--head",
                                             help="Head to fit (repeatable): dense, logreg, linear_svm, svm, knn, "
                                                  "centroid, or all (the default)."),
    features: str = typer.Option("avg", help="Cached features: avg | max | maps (spatial maps, flattened)."),
    class_weight: str = typer.Option("none", help="none | balanced (weights classes by inverse frequency)."),
    seed: int = typer.Option(0, help="Seed of the automatic split, the folds and every head."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: reports/runs/<dataset>_<timestamp>)."),
    report: bool = typer.Option(True, "--report/--no-report",
                                help="Also write the HTML report (reports/<run name>.html)."),
) -> None:
    """Compare classifier heads on cached features; write a run folder and print a leaderboard."""
    from rich.console import Console

    from pipeline.fitrun import run_fit

    run = run_fit(cache_dir, dataset=dataset, backbones=backbone, heads=head, features=features,
                  class_weight=class_weight, seed=seed, out=out, report=report,
                  command=" ".join(["python cli.py", *sys.argv[1:]]), log=lambda m: typer.echo(m, err=True))
    table = run.leaderboard()
    console = Console()
    need = console.measure(table, options=console.options.update_width(10_000)).maximum
    console = Console(width=max(console.width, need))  # never crop the table
    console.print(table)
    typer.echo(f"run folder: {run.run_dir}")
    if run.report_path is not None:
        typer.echo(f"report: {run.report_path}")


@app.command()
def backbones() -> None:
    """List the registered backbones with their input size, preprocessing and feature shapes."""
    from pipeline.backbones import REGISTRY

    for spec in REGISTRY.values():
        side = spec.map_side
        alphas = f"  alpha {{{', '.join(f'{a:g}' for a in spec.alphas)}}}" if spec.alphas else ""
        typer.echo(
            f"{spec.name:<20} {spec.default_input_size}px  pooled {spec.feature_dim:<5} maps {side}x{side}x"
            f"{spec.feature_dim:<5} {spec.preprocess}{alphas}\n{'':<21}{spec.summary}"
        )


@app.command()
def extract(
    data: Path = typer.Argument(..., help="Image folder: DATA/<class>/* or DATA/{train,val,test}/<class>/*."),
    backbone: List[str] = typer.Option(["mobilenet_v2"], "--backbone", "-b",
                                       help="Registered backbone (repeatable; see `backbones`)."),
    weights: str = typer.Option("imagenet", help="'imagenet' (Keras cache, else download), a .weights.h5/.h5/"
                                                 ".keras file, or 'none' for random weights."),
    cache_dir: Path = typer.Option(Path("cache"), help="Where feature caches are written."),
    input_size: Optional[int] = typer.Option(None, help="Square input side (default: the backbone's own)."),
    alpha: Optional[float] = typer.Option(None, help="Width multiplier (MobileNet v1/v2)."),
    resize: str = typer.Option("crop", help="crop (centre crop, default) | squash (stretch) | pad (letterbox)."),
    maps: bool = typer.Option(False, "--maps", help="Also store the last spatial feature maps."),
    max_pool: bool = typer.Option(False, "--max-pool", help="Also store global max pooled vectors."),
    maps_dtype: str = typer.Option("float16", help="Storage type of maps: float16 or float32."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help="Decoding threads (default: CPU count)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first image that cannot be decoded."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    checkpoint_every: int = typer.Option(256, help="Commit finished rows to disk every N images (a crash loses "
                                                   "at most that much work)."),
) -> None:
    """Run frozen backbones over every image once and cache the features (incremental and resumable)."""
    from pipeline.extract import extract_dataset
    from pipeline.data import discover

    ds = discover(data)
    ignored = ", ".join(f"{n} {why}" for why, n in ds.ignored.items() if n)
    typer.echo(f"{ds.root}: {len(ds.items)} images in {len(ds.classes)} classes"
               f"{' (split folders: ' + ', '.join(sorted({i.split for i in ds.items})) + ')' if ds.has_splits else ''}"
               f"{'; ignored ' + ignored if ignored else ''}")
    for name in backbone:
        res = extract_dataset(ds, backbone=name, weights=weights, cache_dir=cache_dir, input_size=input_size,
                              alpha=alpha, resize=resize, maps=maps, max_pool=max_pool, maps_dtype=maps_dtype,
                              batch_size=batch_size, workers=workers, strict=strict, quiet=quiet,
                              command=" ".join(["python cli.py", *sys.argv[1:]]), log=typer.echo,
                              checkpoint_every=checkpoint_every)
        if res.failures:
            typer.echo(f"{len(res.failures)} image(s) could not be decoded (recorded in the cache):", err=True)
            for p, why in res.failures[:20]:
                typer.echo(f"  {p}: {why}", err=True)
            if len(res.failures) > 20:
                typer.echo(f"  ... and {len(res.failures) - 20} more", err=True)


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="Run folder(s) written by `fit`; several are compared on one page."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default: reports/<run>.html)."),
) -> None:
    """Write one self-contained HTML page comparing the heads (and backbones) of one or several fit runs."""
    from pipeline.report import write_report

    typer.echo(str(write_report(runs, out)))


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder written by `fit`."),
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    head: Optional[str] = typer.Option(None, help="Head name or result key (default: the run's best)."),
    out: Optional[Path] = typer.Option(None, help="Write predictions to a .csv or .json file."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file if the recorded one moved "
                                                     "(must have the same SHA-256)."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
) -> None:
    """Label new images with a fitted head (same backbone, weights, preprocessing and resize rule as its cache)."""
    from pipeline.predict import predict_images, write_predictions

    rh, rows = predict_images(run, images, head=head, weights=weights, batch_size=batch_size, log=typer.echo)
    if out is not None:
        typer.echo(f"wrote {write_predictions(rows, rh.class_names, out)} ({len(rows)} images, head {rh.key})")
    else:
        for r in rows:
            typer.echo(f"{r['path']}\t{r['label']}\t{r['probability']:.4f}" if "label" in r
                       else f"{r['path']}\tERROR\t{r['error']}")
    bad = sum(1 for r in rows if "error" in r)
    if bad:
        typer.echo(f"{bad} image(s) could not be decoded", err=True)


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder written by `fit`."),
    out: Path = typer.Option(..., help="Output .keras file (a sidecar .json records classes and input rules)."),
    head: str = typer.Option("dense", help="Keras head to export (dense)."),
    weights: Optional[str] = typer.Option(None, help="Backbone weights file if the recorded one moved."),
) -> None:
    """Save backbone + dense head as one .keras model that plain Keras loads."""
    from pipeline.predict import export_model

    typer.echo(f"wrote {export_model(run, out, head=head, weights=weights)}")


@app.command()
def demo(
    cache_dir: Path = typer.Option(Path("cache"), help="Where the sample's feature cache goes."),
) -> None:
    """Run the whole product on the built-in sample (real faces / non-faces shipped by scikit-image)."""
    from rich.console import Console

    from pipeline.demo import run_demo

    out = run_demo(workdir=cache_dir / "demo-data", cache_dir=cache_dir, log=typer.echo)
    Console(width=max(120, Console().width)).print(out["fit"].leaderboard())
    typer.echo(f"run folder: {out['run']}")
    if out["report"] is not None:
        typer.echo(f"report: {out['report']}")


if __name__ == "__main__":
    main()
