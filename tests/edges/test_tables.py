"""The text tables the CLI prints go through ``dromo_ray.ui.table``: one row per record, the columns aligned,
missing values as ``-``."""

from __future__ import annotations

from dromo_ray.data.suite import summary_table as suite_table
from dromo_ray.rllib.sac import summary_table as behavior_table
from dromo_ray.ui import table


def _columns(line: str) -> list[str]:
    return line.split()


def test_table_aligns_columns_and_writes_missing_as_dash():
    text = table(["a", "long name"], [[1, 2.5], ["xyz", float("nan")], [None, "v"]], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert _columns(lines[1]) == ["a", "long", "name"]
    rows = lines[3:]
    assert [_columns(r) for r in rows] == [["1", "2.50"], ["xyz", "-"], ["-", "v"]]
    starts = {r.index(_columns(r)[1]) for r in rows}  # the second column starts at one offset in every row
    assert len(starts) == 1


def test_behavior_index_table_has_a_row_per_checkpoint():
    index = {"checkpoints": [
        {"name": "step_0010000", "env_steps": 10_000, "return_mean": 512.34, "stochastic_return_mean": 498.06,
         "normalized_score": 16.31},
        {"name": "step_0020000", "env_steps": 20_000, "return_mean": 1400.0, "stochastic_return_mean": 1350.52,
         "normalized_score": 43.6}]}
    lines = behavior_table(index).splitlines()
    assert "checkpoint" in lines[0] and "return (sampled)" in lines[0]
    assert _columns(lines[2]) == ["step_0010000", "10000", "512.3", "498.1", "16.3"]
    assert _columns(lines[3]) == ["step_0020000", "20000", "1400.0", "1350.5", "43.6"]


def test_suite_table_lists_the_parts_made_in_suite_order():
    manifest = {"gym_id": "Hopper-v5", "sampling": "sampled",
                "selection": {"medium": "step_0100000", "expert": "step_1000000", "target_return": 1200.0},
                "parts": {"medium": {"transitions": 1_000, "complete_episodes": 3, "return_mean": 1354.81,
                                     "normalized_score": 42.2},
                          "random": {"transitions": 1_000, "complete_episodes": 50, "return_mean": None,
                                     "normalized_score": None}}}
    lines = suite_table(manifest).splitlines()
    assert lines[0].startswith("Hopper-v5 suite (sampled policies; medium = step_0100000")
    assert "target return 1200.0" in lines[0]
    assert [_columns(r) for r in lines[3:]] == [["random", "1000", "50", "-", "-"],
                                                ["medium", "1000", "3", "1354.8", "42.2"]]
