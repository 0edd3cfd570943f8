"""The small pieces of the evaluation: lookups, grouping, factor space, the table."""

from __future__ import annotations

import json
import math

import numpy as np

from services.evaluate.evaluate import (
    FACTORS,
    PSEUDO,
    REGRESS,
    STYLE_MAP,
    USER_RECALL,
    _grouped,
    _positions,
    factor_space,
    result,
)
from services.evaluate.report import markdown_table, write_json


def test_positions_marks_missing_ids():
    ids = np.array([3, 5, 9])
    assert _positions(ids, np.array([9, 4, 3, 10])).tolist() == [2, -1, 0, -1]
    assert _positions(np.array([], dtype=np.int64), np.array([1])).tolist() == [-1]


def test_grouped_collects_unique_values_per_user():
    got = _grouped(np.array([1, 2, 7]), np.array([2, 1, 2, 2]), np.array([5, 6, 5, 4]))
    assert [g.tolist() for g in got] == [[6], [4, 5], []]


def test_factor_space():
    head = np.array([[3.0, 4.0]])
    assert np.allclose(factor_space(REGRESS, head, None), [[0.6, 0.8]])
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]])
    logits = np.array([[0.0, math.log(3.0)]])  # softmax: 1/4, 3/4
    assert np.allclose(factor_space(PSEUDO, logits, centroids), [[0.25, 0.75]])


def test_table_shows_n_per_row_and_odd_cells(tmp_path):
    rows = [result(STYLE_MAP, REGRESS, 0.5, 100), result(STYLE_MAP, FACTORS, 0.9, 40),
            result(USER_RECALL, REGRESS, float("nan"), 7)]
    table = markdown_table(rows)
    style_line = next(line for line in table.splitlines() if line.startswith(f"| {STYLE_MAP}"))
    assert "| 0.500 |" in style_line and "0.900 (n=40)" in style_line
    assert style_line.endswith("| 100 |")
    write_json(tmp_path / "eval.json", {"seed": np.int64(3)}, rows)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["world"] == {"seed": 3} and saved["results"][2]["score"] is None
