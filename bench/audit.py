"""The data audit on real folders and at scale: what it finds, what it misses, what it costs.

Three parts, each printed from one run (``--part`` picks one; default all):

* ``flowers5``: ``fit`` (heads centroid and logreg, default audit) on ../shared/data/flowers5 cached with the shared
  ImageNet MobileNetV2 weights. Printed: whether the four rose/tulip byte-identical pairs are reported as
  ``across_classes``, the exact and near-duplicate pair counts, the leak count and the leak-free number; a contact
  sheet of the top 20 pairs is written to ``--out`` for a person to check.
* ``planted``: a copy of ../shared/data/hymenoptera with planted defects, built here: 10 val photos re-encoded at
  JPEG quality 60 and resized to 90 % put into train (same class), 5 % of the train labels flipped (the file moved to
  the other class's folder), 5 unrelated photos of scikit-image's samples put into ``train/ants``. Printed: recall
  of the planted leaks, of the flipped labels among the top 2x-as-many suspects and the planted outliers among the
  top 10 of the full outlier ranking; and the counts the audit flags on the unmodified hymenoptera (false alarms).
* ``scale``: the audit alone (``run_audit``) on 10,000, 100,000 and 1,000,000 rows of 1,280 features, made by
  bench/fit_scale.py's recipe from the real flowers5 features and stored as raw float32 rows on disk (read back by
  block, as the cache reader does; the HDF5 reader's own cost is not the audit's), each size in a fresh process:
  wall time, peak RSS (VmHWM) and the search method, with and without faiss-cpu where it matters.

Usage::

    python bench/audit.py [--part flowers5|planted|scale] [--rows 10000,100000,1000000] [--out reports/bench-audit]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _start  # bench/_start.py: the repo on sys.path, TensorFlow's native chatter off

REPO = _start.start(__name__)
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "coralq_mobilenet_v2_1.0_224_no_top.weights.h5"
PAIRS_ROSE_TULIP = ("15922772266_1167a06620.jpg", "17104364030_ee31ee279b_n.jpg", "17291451621_0e39f08b9e_n.jpg",
                    "17291930305_79deae6a90_n.jpg")


def _extract(root: Path, cache_dir: Path) -> Path:
    from pipeline.extract import extract_dataset, resolve_config

    cfg = resolve_config(backbone="mobilenet_v2", weights=str(WEIGHTS), cache_dir=cache_dir, log=lambda m: None)
    return extract_dataset(root, cfg, log=lambda m: None).path


def _fit(cache: Path, out: Path, **kw) -> dict:
    from pipeline.fit import FitConfig, run_fit

    if out.exists():
        shutil.rmtree(out)
    lines: list[str] = []
    run = run_fit(FitConfig(caches=[cache], heads=["centroid", "logreg"], out=out, **kw), log=lines.append)
    for ln in lines:
        if ln.startswith(("audit", "pick", "  without leaks")):
            print("   ", ln)
    return run.results


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def contact_sheet(rows: list[dict[str, str]], root: Path, out_png: Path, n_pairs: int = 20, px: int = 128) -> int:
    """A PNG of the top ``n_pairs`` duplicate pairs (one per cluster), each pair side by side with its kind."""
    from PIL import Image, ImageDraw, ImageOps

    seen, pairs = set(), []
    for r in rows:
        if r["cluster"] not in seen:
            seen.add(r["cluster"])
            pairs.append(r)
    pairs = pairs[:n_pairs]
    cols = 4
    cell_w, cell_h = 2 * px + 12, px + 34
    sheet = Image.new("RGB", (cols * cell_w, max(1, (len(pairs) + cols - 1) // cols) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(pairs):
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        for j, rel in enumerate((r["path"], r["nearest"])):
            with Image.open(root / rel) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((px, px))
                sheet.paste(im, (x0 + 4 + j * (px + 4), y0 + 2))
        draw.text((x0 + 4, y0 + px + 4), f"{r['kind']} d={float(r['distance']):.3f}", fill="black")
        draw.text((x0 + 4, y0 + px + 18), f"{r['class']}/{Path(r['path']).name[:14]} | "
                                          f"{Path(r['nearest']).parts[-2]}", fill="gray")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return len(pairs)


# ---- flowers5 ------------------------------------------------------------------------------------------------------

def part_flowers5(args: argparse.Namespace) -> None:
    print("\n== flowers5 (4,317 photos, hash split 70/30, shared MobileNetV2 weights) ==")
    root = SHARED / "data" / "flowers5"
    t0 = time.perf_counter()
    cache = _extract(root, args.cache_dir / "flowers5")
    print(f"  cache ready in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    doc = _fit(cache, args.out / "runs" / "flowers5")
    print(f"  fit with audit: {time.perf_counter() - t0:.1f} s")
    run = args.out / "runs" / "flowers5"
    rows = _rows(run / "audit" / "duplicates.csv")
    by_path = {r["path"]: r for r in rows}
    found = [name for name in PAIRS_ROSE_TULIP
             if by_path.get(f"rose/{name}", {}).get("kind") == "across_classes"
             and by_path.get(f"rose/{name}", {}).get("nearest") == f"tulip/{name}"]
    d = doc["audit"]["duplicates"]
    print(f"  rose/tulip identical pairs reported across_classes: {len(found)} of 4")
    print(f"  exact pairs {d['exact_pairs']}, near-duplicate pairs {d['near_pairs']}, clusters {d['clusters']}, "
          f"threshold {d['threshold']:.4f} (= {d['near_factor']} x median NN distance {d['median_nn_distance']:.4f})")
    print(f"  leaks {doc['audit']['leaks']['counts']}, suspect labels {doc['audit']['label_issues']['count']} "
          f"(out-of-fold accuracy {doc['audit']['label_issues']['oof_accuracy']:.3f}), outliers "
          f"{doc['audit']['outliers']['count']}")
    n = contact_sheet(rows, root, args.out / "flowers5_top_pairs.png")
    print(f"  contact sheet of the top {n} pairs: {args.out / 'flowers5_top_pairs.png'}")


# ---- planted defects -----------------------------------------------------------------------------------------------

def build_planted(dst: Path, seed: int = 0) -> dict[str, list[str]]:
    """The planted-defect copy of hymenoptera (see the module docstring); returns the planted items' paths."""
    from PIL import Image
    from skimage import data as skdata

    src = SHARED / "data" / "hymenoptera"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    rng = random.Random(seed)
    val = sorted(p for p in (dst / "val").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    leaks = rng.sample(val, 10)
    planted: dict[str, list[str]] = {"leaked_val": [], "leak_copies": [], "flipped": [], "outliers": []}
    for i, p in enumerate(leaks):
        im = Image.open(p).convert("RGB")
        copy = dst / "train" / p.parent.name / f"leak_{i:02d}.jpg"
        im.resize((int(im.width * 0.9), int(im.height * 0.9))).save(copy, quality=60)
        planted["leaked_val"].append(str(p.relative_to(dst)))
        planted["leak_copies"].append(str(copy.relative_to(dst)))
    train = sorted(p for p in (dst / "train").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")
                   and not p.name.startswith("leak_"))
    n_flip = round(0.05 * len(train))
    for p in rng.sample(train, n_flip):
        other = "bees" if p.parent.name == "ants" else "ants"
        moved = dst / "train" / other / p.name
        p.rename(moved)
        planted["flipped"].append(str(moved.relative_to(dst)))
    for name in ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
        path = dst / "train" / "ants" / f"unrelated_{name}.png"
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(path)
        planted["outliers"].append(str(path.relative_to(dst)))
    return planted


def part_planted(args: argparse.Namespace) -> None:
    print("\n== hymenoptera with planted defects (train/val folders, shared MobileNetV2 weights) ==")
    work = Path(tempfile.mkdtemp(prefix="audit-planted-"))
    try:
        planted = build_planted(work / "hymenoptera")
        print(f"  planted: {len(planted['leaked_val'])} val photos re-encoded (q60, 90 %) into train, "
              f"{len(planted['flipped'])} train labels flipped (5 %), {len(planted['outliers'])} unrelated photos "
              f"in train/ants")
        cache = _extract(work / "hymenoptera", work / "cache")
        doc = _fit(cache, work / "run")
        run = work / "run"
        leaked_csv = {r["path"] for r in _rows(run / "audit" / "duplicates.csv") if r["kind"] != "within_split"}
        hit = [p for p in planted["leaked_val"] if p in leaked_csv]
        print(f"  planted leaks found: {len(hit)} of {len(planted['leaked_val'])} (recall "
              f"{len(hit) / len(planted['leaked_val']):.2f}; target >= 0.9); audit leak count "
              f"{doc['audit']['leaks']['counts']}")
        labels = _rows(run / "audit" / "label_issues.csv")
        top = {r["path"] for r in labels[:2 * len(planted["flipped"])]}
        hit_l = [p for p in planted["flipped"] if p in top]
        print(f"  flipped labels among the top {2 * len(planted['flipped'])} suspects: {len(hit_l)} of "
              f"{len(planted['flipped'])} (recall {len(hit_l) / len(planted['flipped']):.2f}; target >= 0.7); "
              f"{len(labels)} suspects in all")
        ranking = _outlier_ranking(cache, doc)
        top10 = ranking[:10]
        hit_o = [p for p in planted["outliers"] if p in top10]
        flagged = {r["path"] for r in _rows(run / "audit" / "outliers.csv")}
        print(f"  planted outliers in the top 10 of the outlier ranking: {len(hit_o)} of 5 (target >= 4); "
              f"above the fence: {len(flagged & set(planted['outliers']))} of 5, {len(flagged)} flagged in all")
        print("\n== unmodified hymenoptera (false alarms) ==")
        clean = _extract(SHARED / "data" / "hymenoptera", args.cache_dir / "hymenoptera")
        cd = _fit(clean, work / "clean")
        a = cd["audit"]
        print(f"  flagged: {a['duplicates']['exact_pairs'] + a['duplicates']['near_pairs']} duplicate pairs, "
              f"{sum(a['leaks']['counts'].values())} leaks, {a['label_issues']['count']} suspect labels, "
              f"{a['outliers']['count']} outliers (of {a['images']} images)")
        for r in _rows(work / "clean" / "audit" / "label_issues.csv"):
            print(f"    suspect label: {r['path']} ({r['class']} -> {r['suggested']}, score {r['score']})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _outlier_ranking(cache: Path, doc: dict) -> list[str]:
    """The full outlier ranking of the run's audit (the file keeps only the images above the fence)."""
    from pipeline.audit import AuditImages, AuditSource, run_audit
    from pipeline.cache import open_features

    with open_features(cache) as r:
        splits = np.array([p.split("/")[0] for p in r.paths])
        images = AuditImages(list(r.paths), np.asarray(r.labels), splits, list(r.class_names), list(r.digests),
                             ["val"])
        audit = run_audit(images, [AuditSource("x", cache.name, lambda i: r.read(np.asarray(i)))])
    return [images.paths[int(i)] for i in audit.outlier_rows]


# ---- scale -----------------------------------------------------------------------------------------------------

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {bench!r})
import _start
_start.start()
import numpy as np
a = json.loads(sys.argv[1])
n, d = a["n"], a["d"]
fd = os.open(a["file"], os.O_RDONLY)
def read(idx):
    idx = np.asarray(idx, dtype=np.int64)
    out = np.empty((len(idx), d), np.float32)
    if len(idx) and (idx[-1] - idx[0] + 1 == len(idx)):
        buf = os.pread(fd, len(idx) * d * 4, int(idx[0]) * d * 4)
        out[:] = np.frombuffer(buf, np.float32).reshape(len(idx), d)
    else:
        for j, i in enumerate(idx):
            out[j] = np.frombuffer(os.pread(fd, d * 4, int(i) * d * 4), np.float32)
    return out
labels = np.load(a["labels"]); splits = np.load(a["splits"])
from pipeline.audit import AuditConfig, AuditImages, AuditSource, run_audit
if not a["faiss"]:
    import pipeline.audit.neighbors as nb
    nb.have_faiss = lambda: False
t0 = time.perf_counter()
images = AuditImages([f"{{i}}" for i in range(n)], labels, splits, [str(c) for c in range(10)], [""] * n, ["test"])
audit = run_audit(images, [AuditSource("synthetic", a["file"], read)], AuditConfig())
wall = time.perf_counter() - t0
hwm = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print("RESULT", json.dumps({{"wall": wall, "peak_mib": hwm, "method": audit.search, "pairs": audit.duplicates.pairs,
                            "skipped": audit.skipped, "reduced": audit.embedding.reduced,
                            "oof_accuracy": audit.oof.accuracy}}))
"""


def part_scale(args: argparse.Namespace) -> None:
    print("\n== audit at scale (bench/fit_scale.py's recipe, 1,280 features, 10 classes, 70/30 split) ==")
    from fit_scale import Recipe, source_features

    work = Path(tempfile.mkdtemp(prefix="audit-scale-", dir=args.tmp))
    try:
        X0, y0, _ = source_features(args.source, work)
        print(f"  {'rows':>9} {'faiss':>5} {'method':>11} {'wall s':>8} {'peak MiB':>9} {'pairs':>6}  note")
        for n in args.rows:
            recipe = Recipe(X0, y0, n)
            f = work / f"rows_{n}.f32"
            with open(f, "wb") as out:
                for s in range(0, n, 65536):
                    out.write(recipe.rows(s, min(n, s + 65536)).astype(np.float32).tobytes())
            np.save(work / "labels.npy", recipe.labels)
            np.save(work / "splits.npy", recipe.splits)
            for use_faiss in ((False, True) if n <= 200_000 else (True, False)):
                a = {"n": n, "d": int(X0.shape[1]), "file": str(f), "labels": str(work / "labels.npy"),
                     "splits": str(work / "splits.npy"), "faiss": use_faiss}
                proc = subprocess.run([sys.executable, "-c", CHILD.format(bench=str(REPO / "bench")), json.dumps(a)],
                                      capture_output=True, text=True)
                res = next((json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if res is None:
                    print(f"  {n:>9,} {str(use_faiss):>5} failed: {proc.stderr[-800:]}")
                    continue
                note = "; ".join(res["skipped"]) or ("PCA-128" if res["reduced"] else "full width")
                print(f"  {n:>9,} {str(use_faiss):>5} {res['method']:>11} {res['wall']:>8.1f} "
                      f"{res['peak_mib']:>9.0f} {res['pairs']:>6}  {note[:110]}")
            f.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "flowers5", "planted", "scale"), default="all")
    ap.add_argument("--rows", default="10000,100000,1000000",
                    type=lambda s: [int(x) for x in s.split(",") if x.strip()])
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench-audit")
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache" / "bench-audit")
    ap.add_argument("--source", type=Path, default=None, help="a MobileNetV2 cache of flowers5 for --part scale")
    ap.add_argument("--tmp", type=Path, default=None)
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"needs {SHARED} beside the repository (shared MobileNetV2 weights and image folders)")
    print(f"machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; load {os.getloadavg()[0]:.1f}")
    for part, fn in (("flowers5", part_flowers5), ("planted", part_planted), ("scale", part_scale)):
        if args.part in ("all", part):
            fn(args)


if __name__ == "__main__":
    main()
