"""The leaderboard printed by ``fit``: a ``rich`` table of a run's heads from its results."""

from __future__ import annotations

from typing import Any

__all__ = ["leaderboard_table", "form_note", "views_note", "interval_text", "vs_pick_note"]


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


def interval_text(value: Any, interval: Any) -> str:
    """``0.961 [0.917, 0.982]`` (the value alone when there is no interval, ``-`` when there is no value)."""
    if not isinstance(value, (int, float)):
        return "-"
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(isinstance(v, (int, float))
                                                                          for v in interval):
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def vs_pick_note(vs: dict[str, Any] | None) -> str:
    """``= tied`` or ``-0.039 p=0.021`` (Holm-corrected McNemar): how a result compares with the pick."""
    if not isinstance(vs, dict):
        return ""
    delta = vs.get("delta")
    d = f"{delta:+.3f}" if isinstance(delta, (int, float)) else "?"
    p = vs.get("p_holm", vs.get("p_value"))
    p_text = f" p={p:.3g}" if isinstance(p, (int, float)) else ""
    return f"= tied ({d})" if vs.get("tied") else f"{d}{p_text}"


def leaderboard_table(results: dict[str, Any]):
    """A ``rich`` table of a run's heads, best selection score first, the pick marked; skipped heads last.

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
    best = results["best"]
    rule = best.get("rule")
    title = (f"{results['dataset']['name']}: heads by {sel_name} accuracy (selection); "
             f"final numbers on {split}" + (" (also the selection split: optimistic)" if sel == split else ""))
    table = Table(title=title, title_justify="left", caption=(
        f"* pick{f' (rule {rule})' if rule else ''}; selection: mean ± standard error; accuracy with its 95 % "
        f"Wilson interval; vs pick: accuracy difference on the same {split} images, '= tied' when its paired "
        f"bootstrap 95 % interval contains 0, else the Holm-corrected exact McNemar p; fit s: final refit; ms/1k: "
        f"predict_proba time per 1,000 images; how: form when approximate, streamed features, search subsample, "
        f"view mode chosen and its accuracy gain"), caption_justify="left")
    widest = max(len(e["backbone_label"]) for e in [*entries, *skipped])
    for col, just, width in (("", "left", 1), ("head", "left", 10), ("backbone", "left", widest),
                             (f"{sel} acc", "right", 6), ("split", "left", 5), ("accuracy", "right", 8),
                             ("vs pick", "left", 7), ("bal. acc", "right", 8), ("macro-F1", "right", 8),
                             ("log-loss", "right", 8), ("fit s", "right", 5), ("ms/1k", "right", 6),
                             ("how", "left", 3)):
        table.add_column(col, justify=just, no_wrap=True, min_width=width)
    best_key = best["key"]
    for e in entries:
        m = e["metrics"][split]
        mark = "*" if e["key"] == best_key else ""
        se = e["selection"].get("se")
        sel_text = f"{e['selection']['score']:.3f}" + (f" ±{se:.3f}" if isinstance(se, (int, float)) else "")
        table.add_row(mark, e["head"], e["backbone_label"], sel_text, split,
                      interval_text(m["accuracy"], (m.get("intervals") or {}).get("accuracy")),
                      "pick" if mark else vs_pick_note(e.get("vs_pick")),
                      f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                      f"{m['log_loss']:.3f}", f"{e['fit_seconds']:.2f}", f"{e['predict_ms_per_1000']:.1f}",
                      ", ".join(n for n in (form_note(e.get("cost")), views_note(e.get("views"), split)) if n),
                      style="bold green" if mark else None)
    for s in skipped:
        table.add_row("", s["head"], s["backbone_label"], "-", split, "skipped", "", "", "", "", "", "",
                      s["reason"], style="yellow")
    return table
