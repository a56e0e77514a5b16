import json

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import RulesConfig
from dicomnode.rules import evaluate_paths, plane_of
from tests.support.dicomfactory import VENDORS, make_series


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_sagittal_t2fs_matches_for_every_vendor_naming(tmp_path, vendor):
    (d,) = evaluate_paths(RulesConfig(), make_series(tmp_path, vendor=vendor))
    assert d.matched, d.reason
    assert d.rule == "sagittal-t2-fatsat"


@pytest.mark.parametrize("kwargs, why", [
    (dict(orientation="axial", description="ax t2 tse fs"), "orientation: axial"),
    (dict(orientation="coronal", description="cor t2 fs"), "orientation: coronal"),
    (dict(description="t1_tse_sag", te=12.0, tr=600.0), "description"),
    (dict(description="Sag FSE", te=12.0, tr=600.0), "weighting: T1-like timing"),
    (dict(description="t2_tse_sag", vendor="philips"), "fat_suppression"),
    (dict(modality="CT", description="Sag spine"), "modality: CT"),
    (dict(slices=4), "slices: 4"),
])
def test_non_matching_series_are_rejected_with_a_reason(tmp_path, kwargs, why):
    (d,) = evaluate_paths(RulesConfig(), make_series(tmp_path, **kwargs))
    assert not d.matched
    assert d.reason.startswith(why), d.reason


def test_stir_only_when_enabled(tmp_path):
    paths = make_series(tmp_path, vendor="philips", description="SAG STIR", te=70.0)
    (d,) = evaluate_paths(RulesConfig(), paths)
    assert not d.matched and "accept_stir" in d.reason
    (d,) = evaluate_paths(RulesConfig(accept_stir=True), paths)
    assert d.matched, d.reason


def test_inconsistent_geometry_is_rejected(tmp_path):
    paths = make_series(tmp_path, slices=10)
    paths[4].unlink()  # a missing slice leaves a gap in the stack
    (d,) = evaluate_paths(RulesConfig(), paths[:4] + paths[5:])
    assert not d.matched and d.reason.startswith("geometry: uneven slice spacing")


def test_plane_and_obliquity():
    assert plane_of([0, 1, 0, 0, 0, -1])[0] == "sagittal"
    plane, angle = plane_of([0, 0.9848, 0.1736, 0, -0.1736, 0.9848][:3] + [0, 0, -1])
    assert plane == "sagittal" and angle == pytest.approx(0.0, abs=1e-3)
    plane, angle = plane_of([0.1736, 0.9848, 0, 0, 0, -1])
    assert plane == "sagittal" and angle == pytest.approx(10.0, abs=0.01)


def test_rules_test_cli_json_over_a_folder_of_mixed_series(tmp_path):
    make_series(tmp_path / "a", vendor="ge")
    make_series(tmp_path / "b", orientation="axial", description="AX T2 FS")
    make_series(tmp_path / "c", modality="CT", description="spine")
    result = CliRunner().invoke(app, ["rules", "test", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert sorted(r["matched"] for r in rows) == [False, False, True]
    assert all({"series_instance_uid", "matched", "reason"} <= set(r) for r in rows)
    text = CliRunner().invoke(app, ["rules", "test", str(tmp_path / "b")]).output
    assert "REJECT" in text and "orientation: axial" in text
