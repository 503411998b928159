"""`analysis/fidelity_speed.py`: the machine-speed measurements behind the README's fidelity section."""

from __future__ import annotations

import json

from analysis.fidelity_speed import main


def _profile(scale: float, date: str) -> dict:
    return {"format": "sglang-ext-profile/1", "meta": {"model": "m", "hardware": "h", "date": date},
            "target": [{"batch_size": b, "tokens_per_request": 1, "context_len": 0, "seconds": scale * 0.01 * b}
                       for b in (1, 2, 4)],
            "prefill": [{"tokens": 8, "context_len": 0, "seconds": 0.05}],
            "draft": []}


def test_profiles_ratio_point_by_point(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_profile(1.0, "t0")))
    b.write_text(json.dumps(_profile(0.9, "t1")))
    assert main(["profiles", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "target     3 points: median 0.900, range 0.90-0.90" in out
    assert "prefill    1 points: median 1.000" in out and "draft" not in out  # no common draft points
