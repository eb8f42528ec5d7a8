"""The table builders: our figures land in the right cells, each beside the paper's figure, and the
three renderings (Markdown, CSV, log_table dict) agree."""
from __future__ import annotations

import csv
import io

import pytest

from orchestrator.pipeline.paper_tables import (MISSING, PAPER, PAPER_TABLE2, PAPER_TABLE7, Table, build_tables,
                                                table2, table3, table7)

OUTCOMES = {
    ("resnet_tiny", "main", "two"): {"4": 91.0, "3": 90.0, "2": 85.0},
    ("resnet_tiny", "main", "three"): {"4": 90.5, "3": 89.5, "2": 84.0, "rand": 87.0},
    ("resnet_tiny", "independent_4", "independent"): {"4": 92.0},
    ("resnet_tiny", "independent_2", "independent"): {"2": 86.0},
    ("resnet_tiny", "no_transitional_bn", "three"): {"4": 40.0, "3": 30.0, "2": 20.0, "rand": 25.0},
}


def _row(table, *labels):
    return next(r for r in table.rows if list(r[:len(labels)]) == list(labels))


def test_table7_puts_each_figure_beside_the_papers():
    """Table 7 must carry, per (architecture, bits), Indep./Stage II/Stage III ours each followed by the
    paper's figure for that cell; toy architectures show the paper's nearest network, labelled."""
    t = table7(OUTCOMES, ["resnet_tiny", "resnet50"], ["4", "3", "2"])
    col = {c: i for i, c in enumerate(t.columns)}
    row = _row(t, "resnet_tiny (paper: ResNet-18)", "4")
    assert row[col["Independent (ours)"]] == 92.0 and row[col[f"Independent ({PAPER})"]] == 69.1
    assert row[col["Stage II (ours)"]] == 91.0 and row[col[f"Stage II ({PAPER})"]] == 69.4
    assert row[col["Stage III (ours)"]] == 90.5 and row[col[f"Stage III ({PAPER})"]] == 69.2
    rand = _row(t, "resnet_tiny (paper: ResNet-18)", "Rand.")
    assert rand[col["Stage III (ours)"]] == 87.0 and rand[col[f"Stage III ({PAPER})"]] == 65.8
    assert rand[col["Stage II (ours)"]] is None  # Stage II has no layer-wise random figure
    r50 = _row(t, "resnet50", "2")
    assert r50[col[f"AdaBits ({PAPER})"]] == PAPER_TABLE7["resnet50"]["adabits"]["2"] == 73.3
    assert r50[col["Stage II (ours)"]] is None
    assert len(t.rows) == 2 * 4


def test_renderings_agree():
    """Markdown, CSV and the log_table dict must hold the same cells, with one decimal; a missing figure is
    '–' in Markdown and the table view, an empty CSV cell, and never null."""
    t = table7({**OUTCOMES, ("resnet_tiny", "main", "two"): {"4": 91.04, "3": 90.0, "2": 85.0}},
               ["resnet_tiny"], ["4", "3", "2"])
    rows = list(csv.reader(io.StringIO(t.to_csv())))
    assert rows[0] == t.columns and len(rows) == 1 + len(t.rows)
    assert rows[1][t.columns.index("Stage II (ours)")] == "91.0"
    assert rows[2][t.columns.index("Independent (ours)")] == ""
    data = t.to_dict()
    assert list(data) == t.columns and data["Stage II (ours)"][0] == "91.0"
    assert data["Independent (ours)"][1] == MISSING
    assert all(isinstance(v, str) for values in data.values() for v in values)  # no null, no 91.0400001
    md = t.to_markdown()
    assert "| resnet_tiny (paper: ResNet-18) | 4 | 92.0 | 69.1 | 69.2 | 91.0 | 69.4 | 90.5 | 69.2 |" in md
    assert f"| resnet_tiny (paper: ResNet-18) | 3 | {MISSING} | 68.5 |" in md


def test_column_names_render_in_the_mlflow_table_view():
    """The MLflow UI's table view shows a column whose name holds '.', '[' or ']' as empty (it reads the name
    as a path): no table may have such a column, and a Table that names one is refused."""
    tables = build_tables(OUTCOMES, architectures=["resnet_tiny", "resnet50"], bit_keys=["4", "3", "2"],
                          ablation_arch="resnet_tiny", main_teacher="none",
                          ablations=dict.fromkeys(["no_transitional_bn", "teachers", "bits_4321",
                                                   "ternary_binary", "quantizers"], True))
    assert [t.name for t in tables] == ["table7", "table1", "table2", "table3", "table4", "table5"]
    for table in tables:
        for column in table.to_dict():
            assert not set(column) & set(".[]"), (table.name, column)
    assert tables[0].columns[:2] == ["Architecture", "Bits"]
    with pytest.raises(ValueError, match="Arch."):
        Table("t", "t", ["Arch.", "4"])


def test_table2_main_chain_fills_its_own_teacher_row():
    """In Table 2 the main chain's figures belong to the row of the teacher it was trained with; the
    other teachers come from their variants."""
    outcomes = {("r", "main", "two"): {"4": 1.0}, ("r", "teacher_none", "two"): {"4": 2.0},
                ("r", "teacher_stage_one", "three"): {"rand": 3.0}}
    t = table2(outcomes, "r", main_teacher="fp32")
    assert _row(t, "Ours-Stage II", "FP32")[2] == 1.0
    assert _row(t, "Ours-Stage II", "-")[2] == 2.0
    assert _row(t, "Ours-Stage II", "FP32")[3] == PAPER_TABLE2["two"]["fp32"]["4"]
    assert _row(t, "Ours-Stage III", "Stage I")[-2] == 3.0
    # A main chain with a teacher per stage (Stage I for II, FP32 for III) fills one row of each stage.
    split = table2({("r", "main", "two"): {"4": 1.0}, ("r", "main", "three"): {"4": 4.0},
                    ("r", "teacher_fp32", "two"): {"4": 5.0}}, "r", main_teacher={"two": "stage_one", "three": "fp32"})
    assert (_row(split, "Ours-Stage II", "Stage I")[2], _row(split, "Ours-Stage III", "FP32")[2]) == (1.0, 4.0)
    assert _row(split, "Ours-Stage II", "FP32")[2] == 5.0


def test_table3_collects_independent_networks_per_bit():
    """Table 3's Independent row takes each bit-width's figure from that bit-width's own network."""
    outcomes = {("r", f"independent_{b}", "independent"): {**dict.fromkeys("4321", -1.0), b: float(b) * 10}
                for b in "4321"}
    t = table3(outcomes, "r")
    row = _row(t, "Independent")
    assert row[1::2] == [40.0, 30.0, 20.0, 10.0]


def test_only_ablations_that_ran_get_a_table():
    """Table 7 is always built; Tables 1-5 only for the switched-on ablations."""
    tables = build_tables(OUTCOMES, architectures=["resnet_tiny"], bit_keys=["4", "3", "2"],
                          ablation_arch="resnet_tiny", ablations={"no_transitional_bn": True},
                          main_teacher="none")
    assert [t.name for t in tables] == ["table7", "table1"]
    assert _row(tables[1], "w/o Transitional BN")[1:3] == [40.0, 8.2]


def test_several_seeds_print_mean_and_standard_deviation():
    """A figure over seeds is their mean ± sample standard deviation, in every rendering; a bit key that
    one seed lacks is left out rather than averaged over fewer runs."""
    from orchestrator.pipeline.paper_tables import MeanStd, format_cell, over_seeds, table1
    runs = [{"4": 80.0, "2": 50.0, "rand": 60.0}, {"4": 82.0, "2": 54.0}, {"4": 84.0, "2": 52.0}]
    merged = over_seeds(runs)
    assert merged == {"4": MeanStd(82.0, 2.0, 3), "2": MeanStd(52.0, 2.0, 3)}
    assert format_cell(merged["4"]) == "82.0 ± 2.0"
    assert over_seeds(runs[:1]) == runs[0]
    t = table1({("r", "main", "three"): merged}, "r")
    assert "82.0 ± 2.0" in t.to_markdown() and "82.0 ± 2.0" in t.to_dict()["4 (ours)"]
