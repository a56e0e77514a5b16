"""`python -m training reader-study {create,serve,add-reader,revoke,report}`: a blinded reader study of
real against synthetic fusions. The administrative side is this command; readers only see their page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def _links(tokens: dict[str, str], base: str) -> None:
    print("Personal links (shown once; the study keeps only their hashes):")
    for name, token in tokens.items():
        print(f"  {name}: {base.rstrip('/')}/r/{token}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training reader-study", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="pick the items, render them alike, write the study and the key apart")
    c.add_argument("--data", required=True, help="paired data set (dicomnode-paired/1)")
    c.add_argument("--model", required=True, help="model folder that makes the synthetic items")
    c.add_argument("--out", required=True, type=Path, help="the study folder (what the server reads)")
    c.add_argument("--key", required=True, type=Path, help="where the key goes (outside the study folder)")
    c.add_argument("--items", type=int, default=40, help="number of items, half real, half synthetic (even)")
    c.add_argument("--readers", nargs="+", required=True, metavar="NAME")
    c.add_argument("--repeats", type=int, default=0, help="items shown a second time to each reader (consistency)")
    c.add_argument("--split", default="test", choices=("train", "val", "test"))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--clinical", action="store_true", help="also ask: uptake at a disc or vertebra, yes or no")
    c.add_argument("--title", default="Real or synthetic?")
    c.add_argument("--base-url", default="http://127.0.0.1:8765", help="how readers reach the server (for the links)")
    s = sub.add_parser("serve", help="serve the reader pages")
    s.add_argument("--study", required=True, type=Path)
    s.add_argument("--host", default="127.0.0.1", help="loopback by default")
    s.add_argument("--port", type=int, default=8765)
    a = sub.add_parser("add-reader", help="a new reader and link on an existing study")
    a.add_argument("--study", required=True, type=Path)
    a.add_argument("--name", required=True)
    a.add_argument("--seed", type=int)
    a.add_argument("--base-url", default="http://127.0.0.1:8765")
    v = sub.add_parser("revoke", help="revoke a reader's link (their answers stay)")
    v.add_argument("--study", required=True, type=Path)
    v.add_argument("--name", required=True)
    r = sub.add_parser("report", help="accuracy, intervals, kappa, AUC, strata, consistency: Markdown, JSON, PNG")
    r.add_argument("--study", required=True, type=Path)
    r.add_argument("--key", required=True, type=Path)
    r.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        if args.command == "create":
            from training.reader.study import create

            tokens = create(args.data, args.model, args.out, args.key, items=args.items, readers=args.readers,
                            repeats=args.repeats, split=args.split, seed=args.seed, clinical=args.clinical,
                            title=args.title)
            print(f"study {args.out}: {args.items} items, {len(tokens)} readers; key {args.key}")
            _links(tokens, args.base_url)
        elif args.command == "serve":
            from training.reader.web import serve

            print(f"serving {args.study} on http://{args.host}:{args.port}/r/<token> (Ctrl-C stops)")
            serve(args.study, args.host, args.port)
        elif args.command == "add-reader":
            from training.reader.study import add_reader

            _links({args.name: add_reader(args.study, args.name, seed=args.seed)}, args.base_url)
        elif args.command == "revoke":
            from training.reader.study import revoke

            if not revoke(args.study, args.name):
                print(f"no reader named {args.name!r}", file=sys.stderr)
                return 2
            print(f"{args.name}'s link is revoked")
        else:
            from training.reader.report import markdown, report

            print(markdown(report(args.study, args.key, args.out)), end="")
    except (OSError, ValueError) as exc:
        print(f"reader-study {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
