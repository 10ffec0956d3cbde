"""The leaderboard printed by ``fit``: a ``rich`` table of a run's heads from its results."""

from __future__ import annotations

from typing import Any

__all__ = ["leaderboard_table", "form_note", "views_note"]


def form_note(cost: dict[str, Any] | None) -> str:
    """A short note of how a head was fitted: its form when not exact, streamed data, the search subsample."""
    if not cost:
        return ""
    notes = []
    if cost.get("form") and cost.get("approximation"):
        notes.append(str(cost["form"]))
    if cost.get("data") == "streamed":
        notes.append("streamed")
    if cost.get("subsample"):
        notes.append(f"search {int(cost.get('search_rows', 0)):,}/{int(cost.get('train_rows', 0)):,}")
    return ", ".join(notes)


def views_note(views: dict[str, Any] | None, split: str) -> str:
    """``views tta +0.021``: the view mode a head chose and what it added to accuracy on ``split`` (empty when the
    head chose among no view modes)."""
    if not views or len(views.get("offered") or []) < 2:
        return ""
    fin = (views.get("final") or {}).get(split) or {}
    gain = (fin.get("added") or {}).get("accuracy")
    return f"views {views.get('chosen')}" + (f" {gain:+.3f}" if isinstance(gain, (int, float)) else "")


def leaderboard_table(results: dict[str, Any]):
    """A ``rich`` table of a run's heads, best selection score first, the best one marked; skipped heads last.

    Parameters
    ----------
    results : dict
        The content of a ``results.json`` as :func:`pipeline.results.load_run` returns it (or ``fit`` wrote it).

    Returns
    -------
    rich.table.Table
    """
    from rich.table import Table

    protocol = results["protocol"]
    split = protocol["final_splits"][-1]
    sel = protocol["selection"]
    sel_name = f"{protocol['cv_folds']}-fold cv" if sel == "cv" else "val"
    entries = sorted(results["results"], key=lambda e: -e["selection"]["score"])
    skipped = results.get("skipped") or []
    title = (f"{results['dataset']['name']}: heads by {sel_name} accuracy (selection); "
             f"final numbers on {split}")
    table = Table(title=title, title_justify="left", caption="* best: highest selection score; fit s: final refit; "
                  "ms/1k: predict_proba time per 1,000 images; how: form when approximate, streamed features, "
                  "search subsample, view mode chosen and its accuracy gain", caption_justify="left")
    widest = max(len(e["backbone_label"]) for e in [*entries, *skipped])
    for col, just, width in (("", "left", 1), ("head", "left", 10), ("backbone", "left", widest),
                             (f"{sel} acc", "right", 6), ("split", "left", 5), ("accuracy", "right", 8),
                             ("bal. acc", "right", 8), ("macro-F1", "right", 8), ("log-loss", "right", 8),
                             ("fit s", "right", 5), ("ms/1k", "right", 6), ("how", "left", 3)):
        table.add_column(col, justify=just, no_wrap=True, min_width=width)
    best_key = results["best"]["key"]
    for e in entries:
        m = e["metrics"][split]
        mark = "*" if e["key"] == best_key else ""
        table.add_row(mark, e["head"], e["backbone_label"], f"{e['selection']['score']:.3f}", split,
                      f"{m['accuracy']:.3f}", f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                      f"{m['log_loss']:.3f}", f"{e['fit_seconds']:.2f}", f"{e['predict_ms_per_1000']:.1f}",
                      ", ".join(n for n in (form_note(e.get("cost")), views_note(e.get("views"), split)) if n),
                      style="bold green" if mark else None)
    for s in skipped:
        table.add_row("", s["head"], s["backbone_label"], "-", split, "skipped", "", "", "", "", "",
                      s["reason"], style="yellow")
    return table
