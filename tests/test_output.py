"""The writer's merge: one row per id (the newest), input order, rows of vanished inputs kept."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from batchcap.items import FatalError
from batchcap.output import ORDER, ResultStore, merge_rows, read_table


def test_merge_keeps_newest_row_per_id_in_input_order():
    table = pa.table({
        "id": ["b", "a", "gone1", "b", "c", "gone2"],
        "status": ["fetch_error", "ok", "ok", "ok", "ok", "ok"],
        ORDER: [1, 0, 7, 1, 2, 9],
    })
    merged = merge_rows(table, {"a": 0, "b": 1, "c": 2})
    assert merged.column("id").to_pylist() == ["a", "b", "c", "gone1", "gone2"]
    assert merged.column("status").to_pylist() == ["ok", "ok", "ok", "ok", "ok"]  # b: the later row won
    assert ORDER not in merged.column_names


def test_store_parts_finalize_and_resume(tmp_path):
    out = str(tmp_path / "o.csv")
    with ResultStore(out, flush_rows=2) as store:
        for i in range(5):
            store.add({"id": f"{i:03d}", "text": f"t{i}", "status": "ok", ORDER: i})
        assert len([p for p in os.listdir(out + ".parts") if p.endswith(".parquet")]) == 2  # 2 flushed parts
    with ResultStore(out) as store:  # a crashed run's parts are read back as done
        assert store.done == {f"{i:03d}" for i in range(5)}
        store.finalize({f"{i:03d}": 4 - i for i in range(5)})
    table = read_table(out)
    assert table.column("id").to_pylist() == ["004", "003", "002", "001", "000"]  # text ids stay text
    assert not os.path.exists(out + ".parts")


def test_bad_output_name_and_missing_folder(tmp_path):
    with pytest.raises(FatalError, match=".parquet or .csv"):
        ResultStore(str(tmp_path / "o.json"))
    with pytest.raises(FatalError, match="does not exist"):
        ResultStore(str(tmp_path / "nope" / "o.parquet")).open()
