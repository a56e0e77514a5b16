"""The DICOM Conformance Statement is generated from the code, and a running node does exactly
what it says: DCMTK's storescu proposes every listed (SOP class, transfer syntax) pair, one
transfer syntax per presentation context, and every SOP class pydicom knows that is not listed,
plus private UIDs; each listed pair is accepted, nothing else is."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom._uid_dict import UID_dictionary

from dicomnode.config import config_from_dict
from dicomnode.conformance import listed_contexts, statement
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import make_raw_config
from tests.support.peers import dcmtk

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "conformance.md"
MR, ELE = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1"
PRIVATE_SOP, PRIVATE_TS = "1.2.826.0.1.3680043.8.498.1.7001", "1.2.826.0.1.3680043.8.498.1.7002"
PER_ASSOCIATION = 127  # 128 contexts at most; the first carries the MR file storescu sends


def test_the_page_in_docs_is_the_generated_statement():
    assert PAGE.read_text(encoding="utf-8") == statement(), "run: dicomnode conformance -o docs/reference/conformance.md"


def test_the_statement_lists_the_scp_classes_and_syntaxes():
    sops, syntaxes = listed_contexts()
    text = statement()
    assert len(sops) == 171 and len(syntaxes) == len(set(syntaxes)) >= 40
    for uid in [*sops[1:], *syntaxes]:
        assert f"`{uid}`" in text


def _propose(tmp_path: Path, port: int, pairs: list[tuple[str, str]], file: Path, k: int) -> dict[tuple[str, str], str]:
    """Propose `pairs` (plus MR/Explicit VR Little Endian for the file) in one association;
    return each pair's result as DCMTK's storescu reports it."""
    ts = sorted({t for _, t in pairs} | {ELE})
    key = {t: f"TS{i}" for i, t in enumerate(ts)}
    lines = ["[[TransferSyntaxes]]"] + [f"[{key[t]}]\nTransferSyntax1 = {t}" for t in ts]
    contexts = [(MR, ELE), *pairs]
    lines += ["[[PresentationContexts]]", "[PCS]"]
    lines += [f"PresentationContext{i + 1} = {sop}\\{key[t]}" for i, (sop, t) in enumerate(contexts)]
    lines += ["[[Profiles]]", "[MATRIX]", "PresentationContexts = PCS"]
    cfg = tmp_path / f"matrix{k}.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    r = subprocess.run([dcmtk("storescu"), "-d", "-xf", str(cfg), "MATRIX", "-aec", "DICOMNODE", "127.0.0.1",
                        str(port), str(file)], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    ac = out[out.find("BEGIN A-ASSOCIATE-AC"):out.find("END A-ASSOCIATE-AC")]
    results = {int(i): why for i, why in re.findall(r"Context ID:\s+(\d+) \(([^)]*)\)", ac)}
    assert r.returncode == 0 and len(results) == len(contexts), out[-3000:]
    return {pair: results[2 * i + 3] for i, pair in enumerate(pairs)}


@pytest.mark.integration
def test_exactly_what_is_listed_is_accepted(tmp_path, port):
    sops, syntaxes = listed_contexts()
    listed = [(s, t) for s in sops for t in syntaxes]
    known = [uid for uid, entry in UID_dictionary.items() if entry[1] == "SOP Class" and uid not in set(sops)]
    unlisted = [(s, ELE) for s in [*known, PRIVATE_SOP]] + [(s, PRIVATE_TS) for s in (MR, sops[0])]
    file = make_series(tmp_path / "in", slices=1)[0]
    results: dict[tuple[str, str], str] = {}
    with Node(config_from_dict(make_raw_config(tmp_path, port)), CopyProcessor()):
        todo = listed + unlisted
        for k in range(0, len(todo), PER_ASSOCIATION):
            results.update(_propose(tmp_path, port, todo[k:k + PER_ASSOCIATION], file, k))
    refused_listed = [p for p in listed if results[p] != "Accepted"]
    accepted_unlisted = [p for p in unlisted if results[p] == "Accepted"]
    assert not refused_listed and not accepted_unlisted, (refused_listed[:5], accepted_unlisted[:5])
    reasons = {results[p] for p in unlisted}
    assert reasons == {"Abstract Syntax Not Supported", "Transfer Syntaxes Not Supported"}
    print(f"conformance matrix: {len(sops)} SOP classes x {len(syntaxes)} transfer syntaxes = {len(listed)} "
          f"listed pairs, all accepted; {len(unlisted)} unlisted pairs ({len(known) + 1} SOP classes, "
          f"{2} private transfer syntax proposals), all refused; {-(-len(todo) // PER_ASSOCIATION)} associations")
