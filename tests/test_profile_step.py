"""benchmarks/profile_step.py, which splits a training step into host and GPU time and itemises the ops
clear-lora adds to plain LoRA, on the CPU (no GPU columns there)."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def test_differences_rank_ops_by_their_per_step_gap():
    import profile_step as ps

    a = {"aten::mm": (4, 100.0), "aten::index_select": (3, 30.0), "aten::add": (1, 5.0)}
    b = {"aten::mm": (4, 90.0), "aten::addmm_": (2, 40.0), "aten::add": (1, 5.0)}
    rows = ps.differences(a, b, k=3)
    assert [r[0] for r in rows] == ["aten::addmm_", "aten::index_select", "aten::mm"]
    assert rows[0] == ("aten::addmm_", 0, 2, 0, 40.0)  # an op one side lacks counts as 0 calls there


def test_a_cpu_profile_row_itemises_what_clear_lora_adds(tmp_path):
    import profile_step as ps

    ps.main(["--lengths", "8", "--repeats", "1", "--profile-steps", "1", "--out", str(tmp_path)])
    md = (tmp_path / "step_profile_cpu.md").read_text()
    row = json.loads((tmp_path / "step_profile_cpu.json").read_text())["rows"][0]
    assert set(row["summary"]) == {ps.ROUTED, "lora", "peft"}
    for s in row["summary"].values():
        assert s["wall_ms"] > 0 and s["host_ms"] > 0 and s["aten_calls"] > 0
        assert s["gpu_ms"] is None and s["kernels"] is None  # no GPU: no device columns, not zeros
    # on the CPU the routed layer gathers the routed rows: calls plain LoRA's step does not make (counts,
    # not times: which ops differ most in time depends on the machine's load)
    assert row["summary"][ps.ROUTED]["aten_calls"] > row["summary"]["lora"]["aten_calls"]
    assert len(row["differences"]["host"]) == 12
    assert row["differences"]["gpu"] == []
    assert f"| {ps.ROUTED} |" in md and "| - | - |" in md
