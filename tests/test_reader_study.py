"""The reader study (training/reader): its statistics against hand-computed values, a study made from
a phantom data set and a tiny model, the server's answers to bad input, and two readers playing a
20-item study through the real page in headless Chromium (Selenium), then the report checked
against figures computed here from the stored answers."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dicomnode.tools.phantom import generate
from tests.support.tinymodel import make_tiny_model
from training.data import build_dataset
from training.reader import report as rep
from training.reader.study import create, revoke

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


# -- the statistics ------------------------------------------------------------------------------

def test_wilson_interval_and_binomial_test_by_hand():
    # Wilson: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = 9/19, z = 1.959964
    z, n, p = 1.959964, 19, 9 / 19
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    got = rep.proportion(9, 19)
    assert got["ci95"] == pytest.approx([(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)], abs=1e-6)
    # exact two-sided test of 2 of 10 against 1/2: P(X <= 2) + P(X >= 8) = 2 * (1 + 10 + 45) / 1024
    assert rep.binomtest(2, 10).pvalue == pytest.approx(112 / 1024)


def test_fleiss_kappa_on_the_textbook_table():
    # Fleiss (1971) as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories: kappa 0.210.
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert rep.fleiss_kappa(table) == pytest.approx(0.210, abs=0.0005)
    # two readers, four items: agree on 3 (p_o = 0.75); marginals 3/8 and 5/8 synthetic
    answers = [{"reader": r, "file": f, "answer": a, "repeat": 0}
               for r, calls in (("a", "SSRR"), ("b", "SRRR")) for f, a in zip("wxyz", calls)
               for a in [("synthetic" if a == "S" else "real")]]
    p_e = (3 / 8) ** 2 + (5 / 8) ** 2
    p_o = (1 + 0 + 1 + 1) / 4  # per item: both agree -> 1, split -> 0
    assert rep.kappa(answers) == pytest.approx((p_o - p_e) / (1 - p_e))


def test_auc_from_ratings_by_hand():
    # synthetic items rated +5, +1, -2; real ones -4, +1: of the 6 pairs synthetic > real in 4, tied in 1
    answers = [{"truth": "synthetic", "answer": "synthetic", "confidence": 5},
               {"truth": "synthetic", "answer": "synthetic", "confidence": 1},
               {"truth": "synthetic", "answer": "real", "confidence": 2},
               {"truth": "real", "answer": "real", "confidence": 4},
               {"truth": "real", "answer": "synthetic", "confidence": 1}]
    assert rep.auc(answers) == pytest.approx((4 + 0.5) / 6)


# -- a study -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reader")
    generate(root / "export", 12, seed=61, min_matrix=64, max_matrix=64, min_slices=8, max_slices=8, pet_grid="mr")
    build_dataset(root / "export", root / "data", source="fusion-sc", site_key=root / "key", val_fraction=0.1,
                  test_fraction=0.4)
    return root / "data", make_tiny_model(root / "tiny")


def _study(source, tmp_path, **kw) -> tuple[Path, Path, dict[str, str]]:
    data, model = source
    out, key = tmp_path / "study", tmp_path / "secret" / "key.json"
    tokens = create(data, model, out, key, items=kw.pop("items", 20), readers=kw.pop("readers", ["ann", "bob"]),
                    repeats=kw.pop("repeats", 2), seed=3, **kw)
    return out, key, tokens


def _png_chunks(data: bytes) -> list[str]:
    pos, kinds = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kinds.append(data[pos + 4:pos + 8].decode())
        pos += 12 + n
    return kinds


def test_a_study_keeps_the_truth_apart_and_renders_both_kinds_alike(source, tmp_path):
    out, key, tokens = _study(source, tmp_path)
    truth = json.loads(key.read_text())["items"]
    assert sorted(v["truth"] for v in truth.values()).count("real") == 10 == len(truth) // 2
    assert len({v["slice"] for v in truth.values()}) == 20  # each slice once: never a real-synthetic pair
    assert key.stat().st_mode & 0o077 == 0
    served = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert served - {"study.sqlite", "study.sqlite-wal", "study.sqlite-shm"} == {f"images/{f}" for f in truth}
    for f in truth:  # no text, time or gamma chunks: only the header, the pixels and the end
        data = (out / "images" / f).read_bytes()
        assert _png_chunks(data) == ["IHDR"] + ["IDAT"] * (len(_png_chunks(data)) - 2) + ["IEND"]
        assert data[16:24] == (256).to_bytes(4, "big") * 2 and data[24:26] == bytes([8, 2])  # 256 x 256, 8-bit RGB
    assert all(len(Path(f).stem) == 32 for f in truth)
    db = sqlite3.connect(out / "study.sqlite")
    assert [c[1] for c in db.execute("PRAGMA table_info(items)")] == ["id", "file"]  # what is served holds no truth
    assert db.execute("SELECT COUNT(*) FROM worklist").fetchone()[0] == 2 * 22
    assert not set(tokens.values()) & {r[0] for r in db.execute("SELECT token_sha256 FROM readers")}
    db.execute("INSERT INTO answers (reader_id, position, item_id, answer, confidence, at) VALUES (1, 1, 1, 'real', 3, 0)")
    for sql in ("UPDATE answers SET answer = 'synthetic'", "DELETE FROM answers"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(sql)
    with pytest.raises(ValueError, match="must not be inside the study folder"):
        create(*source, tmp_path / "s2", tmp_path / "s2" / "key.json", items=4, readers=["x"])


# -- the server ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(source, tmp_path):
    out, key, tokens = _study(source, tmp_path)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "training", "reader-study", "serve", "--study", str(out),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/reader.css", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
    yield base, out, key, tokens
    proc.terminate()
    proc.wait(timeout=10)


def _call(url: str, body: dict | None = None, content_type: str = "application/json") -> tuple[int, bytes, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _answers(out: Path) -> int:
    return sqlite3.connect(out / "study.sqlite").execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_bad_input_gets_a_4xx_and_changes_nothing(server):
    base, out, _, tokens = server
    ann, bob = (f"{base}/r/{tokens[n]}" for n in ("ann", "bob"))
    good = {"position": 1, "answer": "real", "confidence": 3}
    assert _call(f"{base}/r/{'x' * 43}/state")[0] == 404  # an unknown token
    assert _call(f"{ann}/answer", {**good, "confidence": 6})[0] == 400
    assert _call(f"{ann}/answer", {**good, "confidence": 2.5})[0] == 400
    assert _call(f"{ann}/answer", {**good, "answer": "maybe"})[0] == 400
    assert _call(f"{ann}/answer", {**good, "uptake": "yes"})[0] == 400  # no clinical question in this study
    assert _call(f"{ann}/answer", good, content_type="text/plain")[0] == 415
    assert _call(f"{ann}/answer", {**good, "position": 2})[0] == 409  # skipping ahead
    assert _call(f"{ann}/image/2")[0] == 404  # not the current item
    assert _answers(out) == 0
    assert _call(f"{ann}/answer", good)[0] == 201
    assert _call(f"{ann}/answer", good)[0] == 409  # replayed / double-submitted
    assert _call(f"{ann}/answer", {**good, "position": 1, "answer": "synthetic"})[0] == 409
    # bob's list is his own: ann's answer moved nothing of his, and his next item is still 1
    assert json.loads(_call(f"{bob}/state")[1])["position"] == 1
    assert json.loads(_call(f"{ann}/state")[1])["position"] == 2
    assert _call(f"{bob}/answer", {**good, "position": 2})[0] == 409  # ann's next position is not bob's
    assert _answers(out) == 1
    assert revoke(out, "bob")
    assert _call(f"{bob}/state")[0] == 403 and _call(f"{bob}/answer", good)[0] == 403
    assert _call(f"{bob}/image/1")[0] == 403
    assert _answers(out) == 1
    assert _call(f"{ann}/state")[0] == 200  # the others go on


def test_nothing_served_differs_between_real_and_synthetic_but_the_pixels(server):
    base, out, key, tokens = server
    truth = json.loads(key.read_text())["items"]
    ann = f"{base}/r/{tokens['ann']}"
    page = _call(ann)
    assert page[0] == 200 and tokens["ann"].encode() not in page[1]
    assert page[1] == _call(f"{base}/r/{tokens['bob']}")[1]  # the same page for every reader
    db = sqlite3.connect(out / "study.sqlite")
    headers = {}
    for position in range(1, 23):
        status, body, h = _call(f"{ann}/image/{position}")
        assert status == 200
        file = db.execute("SELECT i.file FROM worklist w JOIN items i ON i.id = w.item_id JOIN readers r ON "
                          "r.id = w.reader_id WHERE r.name = 'ann' AND w.position = ?", (position,)).fetchone()[0]
        assert body == (out / "images" / file).read_bytes()
        state = json.loads(_call(f"{ann}/state")[1])
        assert set(state) == {"title", "clinical", "position", "total", "done"}
        fixed = {k: v for k, v in h.items() if k not in ("Date", "Content-Length")}
        headers.setdefault(truth[file]["truth"], []).append(fixed)
        assert _call(f"{ann}/answer", {"position": position, "answer": "real", "confidence": 1})[0] == 201
    real, synthetic = headers["real"], headers["synthetic"]
    assert all(h == real[0] for h in real + synthetic)
    assert set(real[0]) == {"Content-Type", "Cache-Control", "X-Content-Type-Options", "Referrer-Policy",
                            "Content-Security-Policy", "X-Frame-Options", "Server", "Connection"}


# -- two readers in headless Chromium ------------------------------------------------------------

def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--window-size=900,700"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _policy(reader: str, position: int) -> tuple[str, str, str]:
    """A scripted reader: keys for the answer, the confidence and the uptake question."""
    h = (position * (7 if reader == "ann" else 13) + len(reader)) % 10
    return ("s" if h < 5 else "r"), str(1 + h % 5), ("y" if h % 3 else "n")


def _show(driver, position: int, total: int) -> None:
    """Wait until the page shows item `position`, its image decoded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    label = f"Item {position} of {total}"
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: d.find_element(By.ID, "progress").text == label)
    wait.until(lambda d: d.execute_script("const i = document.getElementById('image'); return i.complete && "
                                          "i.naturalWidth === 256 && !document.getElementById('task').hidden"))


def _play(driver, link: str, reader: str, positions: range, total: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(link)
    for position in positions:
        _show(driver, position, total)
        body = driver.find_element(By.TAG_NAME, "body")
        for key in _policy(reader, position):
            body.send_keys(key)
        body.send_keys(Keys.ENTER)
    if positions.stop > total:
        WebDriverWait(driver, 20).until(lambda d: not d.find_element(By.ID, "done").get_attribute("hidden"))


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason="needs Debian's chromium and chromium-driver")
def test_two_readers_in_chromium_and_the_report_by_hand(source, tmp_path):
    pytest.importorskip("selenium")
    out, key, tokens = _study(source, tmp_path, clinical=True, title="Real or synthetic? (test)")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "training", "reader-study", "serve", "--study", str(out),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while _call_ok(f"{base}/reader.css") is False:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        driver = _browser()
        try:  # ann answers ten items, closes the browser, and comes back for the rest
            _play(driver, f"{base}/r/{tokens['ann']}", "ann", range(1, 11), 22)
        finally:
            driver.quit()
        truth = json.loads(key.read_text())["items"]
        db = sqlite3.connect(out / "study.sqlite")
        shot = next(p for (p, f) in db.execute("SELECT w.position, i.file FROM worklist w JOIN items i ON i.id = w.item_id "
                                               "JOIN readers r ON r.id = w.reader_id WHERE r.name = 'bob' AND w.position > 1 "
                                               "ORDER BY w.position") if truth[f]["truth"] == "real")
        driver = _browser()
        try:
            _play(driver, f"{base}/r/{tokens['ann']}", "ann", range(11, 23), 22)
            _play(driver, f"{base}/r/{tokens['bob']}", "bob", range(1, shot), 22)
            _show(driver, shot, 22)
            driver.save_screenshot(str(tmp_path / "reader_study.png"))  # a real item (docs/img/reader_study.png)
            _play(driver, f"{base}/r/{tokens['bob']}", "bob", range(shot, 23), 22)
        finally:
            driver.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if os.environ.get("DICOMNODE_ARTEFACTS"):
        shutil.copy(tmp_path / "reader_study.png", Path(os.environ["DICOMNODE_ARTEFACTS"]) / "reader_study.png")
    # what was stored is what the scripted readers pressed
    stored = db.execute("SELECT r.name, a.position, a.answer, a.confidence, a.uptake, i.file, w.repeat FROM answers a "
                        "JOIN readers r ON r.id = a.reader_id JOIN items i ON i.id = a.item_id JOIN worklist w ON "
                        "w.reader_id = a.reader_id AND w.position = a.position ORDER BY r.name, a.position").fetchall()
    assert len(stored) == 44
    for name, position, answer, confidence, uptake, _, _ in stored:
        a, c, u = _policy(name, position)
        assert (answer, confidence, uptake) == ({"s": "synthetic", "r": "real"}[a], int(c), {"y": "yes", "n": "no"}[u])
    # the report against figures computed here from the stored answers and the key
    proc_r = subprocess.run([sys.executable, "-m", "training", "reader-study", "report", "--study", str(out), "--key",
                             str(key), "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert proc_r.returncode == 0, proc_r.stderr
    r = json.loads((tmp_path / "report" / "report.json").read_text())
    first = [s for s in stored if not s[6]]
    for name in ("ann", "bob", None):
        mine = [s for s in first if name is None or s[0] == name]
        k = sum(s[2] == truth[s[5]]["truth"] for s in mine)
        got = r["pooled"] if name is None else r["readers"][name]
        assert (got["accuracy"]["k"], got["accuracy"]["n"]) == (k, len(mine))
        z, n, p = 1.959964, len(mine), k / len(mine)
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        wilson = [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]
        assert got["accuracy"]["ci95"] == pytest.approx(wilson, abs=1e-6)
        syn = [s for s in mine if truth[s[5]]["truth"] == "synthetic"]
        assert got["sensitivity_synthetic"]["k"] == sum(s[2] == "synthetic" for s in syn)
        firsts = {(s[0], s[5]): s[2] for s in first}
        reps = [s for s in stored if s[6] and (name is None or s[0] == name)]
        assert got["consistency"]["k"] == sum(firsts[(s[0], s[5])] == s[2] for s in reps)
        assert got["consistency"]["n"] == (4 if name is None else 2)
        on_lesion = [s for s in mine if truth[s[5]]["stratum"] != "none"]
        assert got["by_lesion"]["lesion"]["k"] == sum(s[2] == truth[s[5]]["truth"] for s in on_lesion)
        assert got["by_lesion"]["lesion"]["n"] + got["by_lesion"]["no lesion"]["n"] == len(mine)
        lesion = [s for s in syn if truth[s[5]]["stratum"] != "none"]
        assert got["uptake_question"]["synthetic"]["sensitivity"]["k"] == sum(s[4] == "yes" for s in lesion)
    calls = {(s[0], s[5]): s[2] == "synthetic" for s in first}
    items = {s[5] for s in first}
    p_o = sum(calls[("ann", f)] == calls[("bob", f)] for f in items) / len(items)
    share = sum(calls.values()) / len(calls)
    p_e = share ** 2 + (1 - share) ** 2
    assert r["fleiss_kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "47.4 %" in md and "| pooled |" in md
    assert (tmp_path / "report" / "report.png").stat().st_size > 2000


def _call_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except OSError:
        return False
