"""The reader study's report: answers joined with the key, per reader and pooled.

Accuracy (first showings only) with its Wilson 95 % interval and the exact two-sided binomial
test against 50 % (scipy); sensitivity and specificity for "synthetic"; ROC AUC of a 10-point
rating (answer and confidence: -5 = certain real .. +5 = certain synthetic) against the truth
(Mann-Whitney, scipy); Fleiss' kappa over items every reader answered (statsmodels); accuracy by
stratum (lesion-free, the lesion's uptake tertile); consistency on repeated items; the clinical
question's sensitivity and specificity for a lesion study, per source (real, synthetic). The
paper's 47.4 % is the reference line. Markdown, JSON and a PNG figure.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.stats import binomtest, mannwhitneyu
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from training.reader.study import STRATA, connect

PAPER_ACCURACY = 0.474  # Jung et al. 2024: three spine surgeons told real from synthetic at 47.4 %


def load(study: str | Path, key: str | Path) -> list[dict]:
    """Every answer with its reader, repeat flag and the key's truth, slice, patient and stratum."""
    items = json.loads(Path(key).read_text())["items"]
    db = connect(Path(study))
    rows = db.execute("SELECT r.name AS reader, a.position, a.answer, a.confidence, a.uptake, a.at, i.file, w.repeat "
                      "FROM answers a JOIN readers r ON r.id = a.reader_id JOIN items i ON i.id = a.item_id "
                      "JOIN worklist w ON w.reader_id = a.reader_id AND w.position = a.position ORDER BY a.id").fetchall()
    db.close()
    return [dict(r) | items[r["file"]] for r in rows]


def proportion(k: int, n: int) -> dict:
    if n == 0:
        return {"k": 0, "n": 0, "value": None, "ci95": [None, None]}
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"k": k, "n": n, "value": k / n, "ci95": [float(ci.low), float(ci.high)]}


def rating(a: dict) -> int:
    """-5 (certain real) .. +5 (certain synthetic)."""
    return a["confidence"] if a["answer"] == "synthetic" else -a["confidence"]


def auc(answers: list[dict]) -> float | None:
    pos = [rating(a) for a in answers if a["truth"] == "synthetic"]
    neg = [rating(a) for a in answers if a["truth"] == "real"]
    if not pos or not neg:
        return None
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def summary(answers: list[dict]) -> dict:
    """The figures for one reader, or pooled, from first showings."""
    first = [a for a in answers if not a["repeat"]]
    correct = sum(a["answer"] == a["truth"] for a in first)
    syn = [a for a in first if a["truth"] == "synthetic"]
    real = [a for a in first if a["truth"] == "real"]
    out = {"accuracy": proportion(correct, len(first)),
           "p_value_vs_50": float(binomtest(correct, len(first), 0.5).pvalue) if first else None,
           "sensitivity_synthetic": proportion(sum(a["answer"] == "synthetic" for a in syn), len(syn)),
           "specificity_synthetic": proportion(sum(a["answer"] == "real" for a in real), len(real)),
           "auc": auc(first),
           "by_stratum": {s: proportion(sum(a["answer"] == a["truth"] for a in first if a["stratum"] == s),
                                        sum(a["stratum"] == s for a in first)) for s in STRATA},
           "by_lesion": {k: proportion(sum(a["answer"] == a["truth"] for a in first if (a["stratum"] != "none") == les),
                                       sum((a["stratum"] != "none") == les for a in first))
                         for k, les in (("lesion", True), ("no lesion", False))}}
    firsts = {(a["reader"], a["file"]): a for a in first}
    pairs = [(firsts[(a["reader"], a["file"])], a) for a in answers if a["repeat"] and (a["reader"], a["file"]) in firsts]
    out["consistency"] = proportion(sum(x["answer"] == y["answer"] for x, y in pairs), len(pairs))
    if any(a["uptake"] for a in first):
        out["uptake_question"] = {
            src: {"sensitivity": proportion(sum(a["uptake"] == "yes" for a in grp if a["stratum"] != "none"),
                                            sum(a["stratum"] != "none" for a in grp)),
                  "specificity": proportion(sum(a["uptake"] == "no" for a in grp if a["stratum"] == "none"),
                                            sum(a["stratum"] == "none" for a in grp))}
            for src, grp in (("real", real), ("synthetic", syn))}
    return out


def kappa(answers: list[dict]) -> float | None:
    """Fleiss' kappa of the real/synthetic calls over the items every reader answered (first showings)."""
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    readers = {a["reader"] for a in answers}
    for a in answers:
        if not a["repeat"]:
            by_item[a["file"]][a["reader"]] = a["answer"]
    full = [[v[r] == "synthetic" for r in sorted(readers)] for v in by_item.values() if len(v) == len(readers)]
    if len(readers) < 2 or not full:
        return None
    table, _ = aggregate_raters(np.asarray(full, dtype=int), n_cat=2)
    return float(fleiss_kappa(table))


def report(study: str | Path, key: str | Path, out: str | Path) -> dict:
    answers = load(study, key)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by_reader: dict[str, list[dict]] = defaultdict(list)
    for a in answers:
        by_reader[a["reader"]].append(a)
    result = {"study": str(study), "answers": len(answers), "reference_accuracy": PAPER_ACCURACY,
              "readers": {r: summary(v) for r, v in sorted(by_reader.items())},
              "pooled": summary(answers), "fleiss_kappa": kappa(answers)}
    (out / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(markdown(result))
    figure(result, out / "report.png")
    return result


def _pct(p: dict) -> str:
    if p["value"] is None:
        return "-"
    lo, hi = p["ci95"]
    return f"{100 * p['value']:.1f} % ({100 * lo:.1f}-{100 * hi:.1f}; {p['k']}/{p['n']})"


def markdown(r: dict) -> str:
    lines = ["# Reader study report", "",
             f"{r['answers']} answers. Accuracy on first showings with its Wilson 95 % interval; p: exact two-sided "
             f"binomial test against 50 %. Reference: the paper's {100 * PAPER_ACCURACY:.1f} % (Jung et al. 2024).", "",
             "| reader | accuracy | p vs 50 % | sensitivity (synthetic) | specificity | ROC AUC | consistency |",
             "|---|---|---|---|---|---|---|"]
    rows = list(r["readers"].items()) + [("pooled", r["pooled"])]
    for name, s in rows:
        auc_ = "-" if s["auc"] is None else f"{s['auc']:.3f}"
        p = "-" if s["p_value_vs_50"] is None else f"{s['p_value_vs_50']:.3g}"
        lines.append(f"| {name} | {_pct(s['accuracy'])} | {p} | {_pct(s['sensitivity_synthetic'])} | "
                     f"{_pct(s['specificity_synthetic'])} | {auc_} | {_pct(s['consistency'])} |")
    k = r["fleiss_kappa"]
    lines += ["", f"Fleiss' kappa between readers: {'-' if k is None else f'{k:.3f}'}.", "",
              "## Accuracy by stratum (pooled)", "", "| stratum | accuracy |", "|---|---|"]
    lines += [f"| {s} | {_pct(p)} |" for s, p in r["pooled"]["by_stratum"].items()]
    lines += [f"| {s} (all) | {_pct(p)} |" for s, p in r["pooled"]["by_lesion"].items()]
    if "uptake_question" in r["pooled"]:
        lines += ["", "## Uptake at a disc or vertebra (pooled)", "", "| shown | sensitivity | specificity |",
                  "|---|---|---|"]
        lines += [f"| {src} | {_pct(v['sensitivity'])} | {_pct(v['specificity'])} |"
                  for src, v in r["pooled"]["uptake_question"].items()]
    return "\n".join(lines) + "\n"


def figure(r: dict, path: Path, width: int = 640, height: int = 360) -> None:
    """Accuracy per reader and pooled with 95 % intervals, 50 % and the paper's 47.4 % as lines."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 60, width - 20, 30, height - 50
    y = lambda v: bottom - v * (bottom - top)  # noqa: E731
    d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.text((10, y(v) - 6), f"{int(v * 100)} %", fill="black", font=font)
        d.line([(left - 4, y(v)), (left, y(v))], fill="black")
    d.line([(left, y(0.5)), (right, y(0.5))], fill=(150, 150, 150))
    d.line([(left, y(PAPER_ACCURACY)), (right, y(PAPER_ACCURACY))], fill=(200, 60, 60))
    d.text((right - 170, y(PAPER_ACCURACY) + 2), "Jung et al. 47.4 %", fill=(200, 60, 60), font=font)
    bars = list(r["readers"].items()) + [("pooled", r["pooled"])]
    step = (right - left) / max(1, len(bars))
    for i, (name, s) in enumerate(bars):
        acc = s["accuracy"]
        if acc["value"] is None:
            continue
        x0, x1 = left + i * step + step * 0.25, left + i * step + step * 0.75
        d.rectangle([x0, y(acc["value"]), x1, bottom], fill=(70, 110, 180) if name != "pooled" else (40, 60, 110))
        xm = (x0 + x1) / 2
        lo, hi = acc["ci95"]
        d.line([(xm, y(lo)), (xm, y(hi))], fill="black", width=2)
        d.line([(xm - 6, y(lo)), (xm + 6, y(lo))], fill="black")
        d.line([(xm - 6, y(hi)), (xm + 6, y(hi))], fill="black")
        d.text((x0, bottom + 8), name[:14], fill="black", font=font)
    d.text((left, 8), "Accuracy telling real from synthetic (95 % CI)", fill="black", font=font)
    img.save(path)
