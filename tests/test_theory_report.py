"""The claims report: structure, the cheap claims, the volume comparison, the CLI."""

import json

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from mode.steps import MomentumStep, apply_step
from theory import report
from theory.__main__ import main
from theory.volume import RevNetStep

KEYS = {"id", "statement", "source", "cases", "worst_error", "tolerance", "verdict",
        "criterion", "details"}


def test_cheap_claims_have_the_documented_shape_and_hold():
    rng = np.random.default_rng(0)
    for claim in (report.claim_range(True), report.claim_first_order_det(rng, True),
                  report.claim_jacobian(rng, True)):
        assert KEYS <= set(claim)
        assert claim["source"] in ("paper abstract", "design notes", "derived here")
        assert claim["cases"] > 0
        assert claim["verdict"] == "holds", claim


def test_volume_momentum_vs_revnet():
    torch.manual_seed(0)
    d, gamma = 5, 0.7
    W = torch.randn(d, d, dtype=torch.float64)

    def f(x):
        return torch.tanh(x @ W.T)

    s = torch.randn(2 * d, dtype=torch.float64)
    J = jacobian(lambda u: torch.cat(apply_step(MomentumStep(f, gamma), (u[:d], u[d:]))), s)
    assert torch.linalg.det(J).item() == pytest.approx(gamma**d, rel=1e-12)
    J = jacobian(lambda u: torch.cat(apply_step(RevNetStep(f, f), (u[:d], u[d:]))), s)
    assert torch.linalg.det(J).item() == pytest.approx(1.0, abs=1e-12)
    # the RevNet step inverts exactly
    x1, x2 = RevNetStep(f, f)(s[:d], s[d:])
    y1, y2 = RevNetStep(f, f).inverse(x1, x2)
    torch.testing.assert_close(torch.cat([y1, y2]), s, rtol=0, atol=1e-14)


def test_format_table_has_one_row_per_claim():
    rows = [dict(id=i, statement="s", source="derived here", cases=1, worst_error=0.1,
                 tolerance=1.0, verdict="holds", criterion="c", details={}) for i in (1, 2)]
    assert len(report.format_table(rows).splitlines()) == 2 + 2


def test_verify_claims_rejects_non_bool_quick():
    with pytest.raises(TypeError, match="quick"):
        report.verify_claims(quick=1)


@pytest.mark.slow
def test_full_report_cli_writes_json(tmp_path, capsys):
    path = tmp_path / "claims.json"
    assert main(["--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert [c["id"] for c in data["claims"]] == list(range(1, 11))
    assert all({"proved", "measured"} <= set(c) for c in data["claims"])
    assert all(c["verdict"] == "holds" for c in data["claims"])
    assert "claims hold" in capsys.readouterr().out


def test_json_writer_handles_numpy_and_complex(tmp_path):
    from theory.__main__ import write_json

    path = tmp_path / "sub" / "out.json"
    write_json(str(path), {"a": np.float64(1.5), "b": np.array([1, 2]), "c": 2 + 3j,
                           "d": np.bool_(True), "e": [np.complex128(1j)], "f": float("inf")})
    data = json.loads(path.read_text())
    assert data == {"a": 1.5, "b": [1, 2], "c": [2.0, 3.0], "d": True, "e": [[0.0, 1.0]],
                    "f": float("inf")}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary left behind
