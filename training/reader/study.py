"""A blinded reader study: its items, readers and answers (SQLite), and the key kept apart.

`create` picks N slices of one split of a paired data set, balanced by stratum (lesion-free, or
the lesion's uptake tertile), and shows half of them as their real fusion and half as the
model's synthetic fusion: each slice appears once, so no reader ever sees a real and a synthetic
image of the same slice. Both kinds are rendered the same way: the model-grid RGB image as 8-bit
PNG, written by the same encoder call with no metadata, under random file names, in a shuffled
order. Each reader gets a seeded random order of all items plus `repeats` repeated ones (for
consistency) and a personal link with an unguessable token; only the token's SHA-256 is stored.

The study folder holds what the server needs and nothing that tells real from synthetic:
`study.sqlite` and `images/`. The key (item -> real or synthetic, slice, stratum) is written to
its own path, which the server never reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import secrets
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, file TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS readers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
                                    revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS worklist (reader_id INTEGER NOT NULL REFERENCES readers(id), position INTEGER NOT NULL,
                                     item_id INTEGER NOT NULL REFERENCES items(id), repeat INTEGER NOT NULL,
                                     PRIMARY KEY (reader_id, position));
CREATE TABLE IF NOT EXISTS answers (id INTEGER PRIMARY KEY, reader_id INTEGER NOT NULL REFERENCES readers(id),
                                    position INTEGER NOT NULL, item_id INTEGER NOT NULL REFERENCES items(id),
                                    answer TEXT NOT NULL CHECK (answer IN ('real', 'synthetic')),
                                    confidence INTEGER NOT NULL CHECK (confidence BETWEEN 1 AND 5),
                                    uptake TEXT CHECK (uptake IN ('yes', 'no')), at REAL NOT NULL,
                                    UNIQUE (reader_id, position));
CREATE TRIGGER IF NOT EXISTS answers_append_only_u BEFORE UPDATE ON answers
    BEGIN SELECT RAISE(ABORT, 'answers are append-only'); END;
CREATE TRIGGER IF NOT EXISTS answers_append_only_d BEFORE DELETE ON answers
    BEGIN SELECT RAISE(ABORT, 'answers are append-only'); END;
"""
STRATA = ("none", "low", "mid", "high")  # lesion-free, or the lesion's uptake tertile in the split


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def connect(study: Path) -> sqlite3.Connection:
    db = sqlite3.connect(Path(study) / "study.sqlite", isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")  # an acknowledged answer survives a power cut
    return db


@dataclass(frozen=True)
class Slice:
    index: int
    patient: str
    stratum: str


def strata(rows: list[dict]) -> list[Slice]:
    """The split's slices with their stratum: 'none' without a lesion, else the uptake tertile."""
    suv = sorted({float(r["uptake"]) for r in rows if r["lesion"] == "1" and r["uptake"]})
    cuts = (np.quantile(suv, [1 / 3, 2 / 3]) if suv else (np.inf, np.inf))

    def stratum(r: dict) -> str:
        if r["lesion"] != "1" or not r["uptake"]:
            return "none"
        v = float(r["uptake"])
        return "low" if v <= cuts[0] else "mid" if v <= cuts[1] else "high"

    return [Slice(int(r["index"]), r["patient_id"], stratum(r)) for r in rows]


def pick(slices: list[Slice], n: int, rng: np.random.Generator) -> list[tuple[Slice, str]]:
    """n slices spread over the strata as evenly as the split allows (round robin), each patient's
    first slice before a second one of the same patient; then, stratum by stratum, alternately
    real and synthetic: half of each overall, and within a stratum at most one apart."""
    by: dict[str, list[Slice]] = defaultdict(list)
    for s in slices:
        by[s.stratum].append(s)
    for k, group in by.items():
        shuffled = [group[int(i)] for i in rng.permutation(len(group))]
        seen: dict[str, int] = defaultdict(int)
        rank = []
        for s in shuffled:
            rank.append(seen[s.patient])
            seen[s.patient] += 1
        by[k] = [s for _, s in sorted(zip(rank, shuffled), key=lambda t: t[0])]
    chosen: list[Slice] = []
    order = [k for k in STRATA if by.get(k)]
    while len(chosen) < n and any(by[k] for k in order):
        for k in order:
            if by[k] and len(chosen) < n:
                chosen.append(by[k].pop(0))
    if len(chosen) < n:
        raise ValueError(f"the split has only {len(chosen)} slices; asked for {n}")
    chosen.sort(key=lambda s: STRATA.index(s.stratum))
    first = int(rng.integers(2))
    return [(s, ("real", "synthetic")[(i + first) % 2]) for i, s in enumerate(chosen)]


def worklist(n_items: int, repeats: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A reader's order: every item once in random order, then `repeats` of them again, each at
    least n_items // 2 positions after its first showing. (item index, repeat flag) pairs."""
    order = [int(i) for i in rng.permutation(n_items)]
    again = [int(i) for i in rng.choice(order[: max(1, n_items - n_items // 2)], size=repeats, replace=False)]
    return [(i, 0) for i in order] + [(i, 1) for i in again]


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Every image of a study through this one call: 8-bit RGB PNG, no text chunks, no gamma."""
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(path, format="PNG", compress_level=6)


def create(data: str | Path, model: str | Path, out: str | Path, key: str | Path, *, items: int,
           readers: Sequence[str], repeats: int = 0, split: str = "test", seed: int = 0, clinical: bool = False,
           title: str = "Real or synthetic?") -> dict[str, str]:
    """Create the study; returns reader name -> token (shown once: the study keeps only hashes)."""
    import torch

    from dicomnode.infer.grid import unit_to_rgb
    from dicomnode.infer.model import load_model

    data, out, key = Path(data), Path(out), Path(key)
    if items < 2 or items % 2:
        raise ValueError("--items must be an even number of at least 2")
    if not readers or len(set(readers)) != len(readers):
        raise ValueError("give one or more distinct reader names")
    if repeats > items // 2:
        raise ValueError(f"--repeats must be at most half the items ({items // 2})")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    if key.resolve().is_relative_to(out.resolve()):
        raise ValueError("the key must not be inside the study folder (the folder is what the server reads)")
    with open(data / "pairs.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    rng = np.random.default_rng(seed)
    chosen = pick(strata(rows), items, rng)
    mr = np.load(data / "mr.npy", mmap_mode="r")
    fusion = np.load(data / "fusion.npy", mmap_mode="r")
    fm = load_model(model, "cpu")
    synth_idx = [s.index for s, kind in chosen if kind == "synthetic"]
    with torch.inference_mode():
        batch = torch.from_numpy(np.asarray(mr[synth_idx], dtype=np.float32))
        made = {i: unit_to_rgb(fm.translate(batch[k:k + 1], seed=seed + k).rgb[0].float().numpy())
                for k, i in enumerate(synth_idx)}
    (out / "images").mkdir(parents=True)
    entries = []
    for j in rng.permutation(len(chosen)):  # written in a shuffled order: file times tell nothing
        s, kind = chosen[int(j)]
        rgb = made[s.index] if kind == "synthetic" else np.asarray(fusion[s.index])
        name = f"{secrets.token_hex(16)}.png"
        write_png(out / "images" / name, rgb)
        entries.append({"file": name, "truth": kind, "slice": s.index, "patient": s.patient, "stratum": s.stratum})
    rng.shuffle(entries)
    db = connect(out)
    db.executescript(SCHEMA)
    tokens = {}
    with db:
        for k, v in {"title": title, "clinical": json.dumps(clinical), "items": str(items),
                     "repeats": str(repeats)}.items():
            db.execute("INSERT INTO study VALUES (?, ?)", (k, v))
        for i, e in enumerate(entries, start=1):
            db.execute("INSERT INTO items (id, file) VALUES (?, ?)", (i, e["file"]))
        for name in readers:
            tokens[name] = secrets.token_urlsafe(32)
            rid = db.execute("INSERT INTO readers (name, token_sha256) VALUES (?, ?)",
                             (name, token_hash(tokens[name]))).lastrowid
            for pos, (item, rep) in enumerate(worklist(items, repeats, rng), start=1):
                db.execute("INSERT INTO worklist VALUES (?, ?, ?, ?)", (rid, pos, item + 1, rep))
    db.close()
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps({"format": "dicomnode-reader-key/1", "data": str(data), "model": str(model),
                               "split": split, "seed": seed, "model_version": fm.version,
                               "items": {e["file"]: {k: e[k] for k in ("truth", "slice", "patient", "stratum")}
                                         for e in entries}}, indent=1) + "\n")
    key.chmod(0o600)
    return tokens


def add_reader(study: Path, name: str, repeats: int | None = None, seed: int | None = None) -> str:
    """A new reader on an existing study; returns the token."""
    db = connect(study)
    n = int(db.execute("SELECT value FROM study WHERE key='items'").fetchone()[0])
    reps = int(db.execute("SELECT value FROM study WHERE key='repeats'").fetchone()[0]) if repeats is None else repeats
    rng = np.random.default_rng(seed)
    token = secrets.token_urlsafe(32)
    with db:
        rid = db.execute("INSERT INTO readers (name, token_sha256) VALUES (?, ?)", (name, token_hash(token))).lastrowid
        for pos, (item, rep) in enumerate(worklist(n, reps, rng), start=1):
            db.execute("INSERT INTO worklist VALUES (?, ?, ?, ?)", (rid, pos, item + 1, rep))
    db.close()
    return token


def revoke(study: Path, name: str) -> bool:
    db = connect(study)
    with db:
        changed = db.execute("UPDATE readers SET revoked = 1 WHERE name = ?", (name,)).rowcount
    db.close()
    return bool(changed)
