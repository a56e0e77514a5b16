"""The reader's page: one image at a time, real or synthetic, a confidence, and optionally the
clinical question; answers appended to the study's SQLite database before the reply.

Routes (TOKEN is the reader's personal token; the server keeps only its SHA-256):

- GET  /r/TOKEN                  the page (the same bytes for every reader)
- GET  /reader.js, /reader.css   its script and style
- GET  /r/TOKEN/state            {"title", "clinical", "position", "total", "done"}
- GET  /r/TOKEN/image/POSITION   the PNG of the reader's current item (no other position)
- POST /r/TOKEN/answer           {"position", "answer": real|synthetic, "confidence": 1-5, "uptake": yes|no}

An unknown token gets 404, a revoked one 403; an answer for any position but the reader's next
one (a replay, a double submit, a skip ahead) 409 and changes nothing; a malformed one 400. The
server never reads the key, so nothing it sends (page, script, state, image bytes, headers) can
depend on whether an item is real or synthetic: the image response is the file's bytes with the
same fixed headers for every item.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

from aiohttp import web

from training.reader.study import connect, token_hash

HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'",
           "X-Frame-Options": "DENY"}
ASSETS = Path(__file__).with_name("assets")


class ReaderApp:
    def __init__(self, study: str | Path):
        self.study = Path(study)
        self.db = connect(self.study)
        self.lock = asyncio.Lock()  # one writer at a time; SQLite serialises anyway
        meta = dict(self.db.execute("SELECT key, value FROM study").fetchall())
        self.title, self.clinical = meta["title"], json.loads(meta["clinical"])
        self.page = (ASSETS / "reader.html").read_bytes()

    # -- helpers --------------------------------------------------------------------------
    def _reader(self, request: web.Request) -> sqlite3.Row:
        row = self.db.execute("SELECT id, revoked FROM readers WHERE token_sha256 = ?",
                              (token_hash(request.match_info["token"]),)).fetchone()
        if row is None:
            raise web.HTTPNotFound(text="unknown link", headers=HEADERS)
        if row["revoked"]:
            raise web.HTTPForbidden(text="this link has been revoked", headers=HEADERS)
        return row

    def _progress(self, reader_id: int) -> tuple[int, int]:
        """(the next position to answer, the number of positions)."""
        total = self.db.execute("SELECT COUNT(*) FROM worklist WHERE reader_id = ?", (reader_id,)).fetchone()[0]
        done = self.db.execute("SELECT COUNT(*) FROM answers WHERE reader_id = ?", (reader_id,)).fetchone()[0]
        return done + 1, total

    # -- routes ---------------------------------------------------------------------------
    async def page_(self, request: web.Request) -> web.Response:
        self._reader(request)
        return web.Response(body=self.page, content_type="text/html", charset="utf-8", headers=HEADERS)

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = {"reader.js": "text/javascript", "reader.css": "text/css"}[name]
        return web.Response(body=(ASSETS / name).read_bytes(), content_type=kind, charset="utf-8", headers=HEADERS)

    async def state(self, request: web.Request) -> web.Response:
        reader = self._reader(request)
        position, total = self._progress(reader["id"])
        return web.json_response({"title": self.title, "clinical": self.clinical, "position": min(position, total),
                                  "total": total, "done": position > total}, headers=HEADERS)

    async def image(self, request: web.Request) -> web.Response:
        reader = self._reader(request)
        try:
            position = int(request.match_info["position"])
        except ValueError:
            raise web.HTTPNotFound(headers=HEADERS) from None
        if position != self._progress(reader["id"])[0]:
            raise web.HTTPNotFound(text="not your current item", headers=HEADERS)
        row = self.db.execute("SELECT i.file FROM worklist w JOIN items i ON i.id = w.item_id "
                              "WHERE w.reader_id = ? AND w.position = ?", (reader["id"], position)).fetchone()
        if row is None:
            raise web.HTTPNotFound(headers=HEADERS)
        body = (self.study / "images" / row["file"]).read_bytes()
        return web.Response(body=body, content_type="image/png", headers=HEADERS)

    async def answer(self, request: web.Request) -> web.Response:
        reader = self._reader(request)
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(text="send JSON", headers=HEADERS)
        try:
            body = await request.json()
            position, answer, confidence = body["position"], body["answer"], body["confidence"]
            uptake = body.get("uptake")
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text="expected JSON with position, answer and confidence", headers=HEADERS) from None
        if answer not in ("real", "synthetic"):
            raise web.HTTPBadRequest(text="answer must be 'real' or 'synthetic'", headers=HEADERS)
        if type(confidence) is not int or not 1 <= confidence <= 5:
            raise web.HTTPBadRequest(text="confidence must be an integer from 1 to 5", headers=HEADERS)
        if self.clinical and uptake not in ("yes", "no") or not self.clinical and uptake is not None:
            raise web.HTTPBadRequest(text="uptake must be 'yes' or 'no'" if self.clinical else
                                     "this study asks no uptake question", headers=HEADERS)
        if type(position) is not int:
            raise web.HTTPBadRequest(text="position must be an integer", headers=HEADERS)
        async with self.lock:
            expected, total = self._progress(reader["id"])
            if position != expected or position > total:
                raise web.HTTPConflict(text=f"the next item to answer is {min(expected, total)}"
                                       if expected <= total else "all items are answered", headers=HEADERS)
            item = self.db.execute("SELECT item_id FROM worklist WHERE reader_id = ? AND position = ?",
                                   (reader["id"], position)).fetchone()["item_id"]
            try:
                with self.db:
                    self.db.execute("INSERT INTO answers (reader_id, position, item_id, answer, confidence, uptake, at) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                    (reader["id"], position, item, answer, confidence, uptake, time.time()))
            except sqlite3.IntegrityError:
                raise web.HTTPConflict(text="already answered", headers=HEADERS) from None
        return web.json_response({"stored": position, "done": position == total}, status=201, headers=HEADERS)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4096)
        app.add_routes([web.get("/r/{token}", self.page_), web.get("/r/{token}/state", self.state),
                        web.get("/r/{token}/image/{position}", self.image), web.post("/r/{token}/answer", self.answer),
                        web.get("/{name:reader\\.(js|css)}", self.asset)])
        app.on_cleanup.append(lambda _: self._close())
        return app

    async def _close(self) -> None:
        self.db.close()


def serve(study: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the study until interrupted (loopback by default)."""
    web.run_app(ReaderApp(study).app(), host=host, port=port, access_log=None, print=None)
