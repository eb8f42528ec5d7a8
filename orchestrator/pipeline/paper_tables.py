"""The paper's result tables: its ImageNet figures as data, and builders that put ours beside them.

Our figures come in as `Outcomes`: for each (architecture, variant, stage) the top-1 (%) per bit-width
key ("4", "3", "2", "1", "rand"). Variants are the names the pipeline plan gives its chains (`main`,
`independent_<b>`, `no_transitional_bn`, `teacher_<t>`, `bits_4321`, `ternary_binary`, `asymmetric`,
`asymmetric_round`). Every table renders as Markdown, CSV and a column dict for `mlflow.log_table`;
each of our columns is followed by the paper's figure, labelled as the paper's (ImageNet top-1, %).

Column names hold no ".", "[" or "]": the MLflow UI's table view reads such a name as a path into the row
and shows the column empty. Figures show with one decimal and a missing one as "–" (an empty CSV cell).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field



@dataclass(frozen=True)
class MeanStd:
    """A figure over several seeds: mean and sample standard deviation, shown as "mean ± std"."""

    mean: float
    std: float
    n: int

    def __float__(self) -> float:
        return self.mean


Cell = float | MeanStd | None
PerBit = dict[str, float | MeanStd]
# (architecture, variant, stage) -> top-1 (%) per bit key; stage is a core Stage key: "two", "three" or
# "independent" (variant independent_<b>).
Outcomes = dict[tuple[str, str, str], PerBit]

PAPER = "paper, ImageNet"
MISSING = "–"
UNSAFE_IN_COLUMN_NAMES = ".[]"  # the MLflow UI's table view reads these as a path into the row

# Table 7: architecture -> method -> bit key -> top-1 (%). AdaBits' ResNet-50 figures are taken from [21].
PAPER_TABLE7: dict[str, dict[str, dict[str, float]]] = {
    "resnet18": {"indep": {"4": 69.1, "3": 68.5, "2": 65.1}, "adabits": {"4": 69.2, "3": 68.5, "2": 65.1},
                 "two": {"4": 69.4, "3": 68.7, "2": 65.6}, "three": {"4": 69.2, "3": 68.6, "2": 64.4, "rand": 65.8}},
    "resnet34": {"indep": {"4": 73.1, "3": 72.6, "2": 70.2}, "adabits": {"4": 73.0, "3": 72.5, "2": 70.0},
                 "two": {"4": 73.0, "3": 72.6, "2": 70.1}, "three": {"4": 72.9, "3": 72.5, "2": 69.6, "rand": 70.5}},
    "resnet50": {"indep": {"4": 75.5, "3": 75.3, "2": 72.8}, "adabits": {"4": 76.3, "3": 75.9, "2": 73.3},
                 "two": {"4": 75.2, "3": 74.9, "2": 72.7}, "three": {"4": 75.2, "3": 74.8, "2": 72.1, "rand": 73.2}},
    "ebn_4_8_8_16": {"indep": {"4": 74.0, "3": 73.5, "2": 70.7}, "adabits": {},
                     "two": {"4": 74.0, "3": 73.4, "2": 70.5}, "three": {"4": 73.9, "3": 73.3, "2": 70.4, "rand": 71.8}},
    "ebn_4_8_16_32": {"indep": {"4": 73.8, "3": 73.3, "2": 69.8}, "adabits": {},
                      "two": {"4": 73.8, "3": 73.2, "2": 69.7}, "three": {"4": 73.3, "3": 72.8, "2": 68.9, "rand": 70.0}},
    "ebn_4_4_4_4": {"indep": {"4": 74.7, "3": 74.2, "2": 71.5}, "adabits": {},
                    "two": {"4": 74.6, "3": 74.2, "2": 71.1}, "three": {"4": 74.7, "3": 74.2, "2": 71.4, "rand": 72.1}},
}
# The toy architectures have no figure of their own; their rows show the paper's nearest network.
PAPER_COUNTERPART = {"resnet_tiny": "resnet18", "ebn_tiny": "ebn_4_4_4_4"}
PAPER_NAMES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
               "ebn_4_8_8_16": "EBN 4:8:8:16", "ebn_4_8_16_32": "EBN 4:8:16:32", "ebn_4_4_4_4": "EBN 4:4:4:4"}

# Table 1 (ResNet-18, Stage III): with / without Transitional BN.
PAPER_TABLE1 = {"no_transitional_bn": {"4": 8.2, "3": 5.6, "2": 10.2, "rand": 8.8},
                "transitional_bn": {"4": 69.2, "3": 68.6, "2": 64.4, "rand": 65.8}}
# Table 2 (ResNet-18): stage -> teacher -> figures.
PAPER_TABLE2 = {"two": {"none": {"4": 69.1, "3": 68.5, "2": 65.1},
                        "stage_one": {"4": 69.4, "3": 68.7, "2": 65.6},
                        "fp32": {"4": 69.3, "3": 68.7, "2": 65.5}},
                "three": {"none": {"4": 69.0, "3": 68.4, "2": 64.0, "rand": 65.5},
                          "stage_one": {"4": 69.1, "3": 68.6, "2": 64.5, "rand": 65.7},
                          "fp32": {"4": 69.2, "3": 68.6, "2": 64.4, "rand": 65.8}}}
# Table 3 (ResNet-18, bits 4-3-2-1). The paper prints "Ours (Stage II)" twice: the 4-3-2 meta-network,
# then the 4-3-2-1 one.
PAPER_TABLE3 = {"independent": {"4": 69.1, "3": 68.5, "2": 65.1, "1": 59.0},
                "adabits": {"4": 69.2, "3": 68.5, "2": 65.1},
                "two_432": {"4": 69.4, "3": 68.7, "2": 65.6},
                "two_4321": {"4": 68.7, "3": 68.0, "2": 64.2, "1": 57.3}}
# Table 4 (ResNet-18, activations {2,3,4} / weights {1,3,4}); the "1.5*" column is A2/W1 (bit key "2").
PAPER_TABLE4 = {"adabits": {"4": 69.2, "3": 68.5},
                "two": {"4": 69.0, "3": 68.7, "2": 64.0},
                "three": {"4": 69.0, "3": 68.5, "2": 62.1, "rand": 62.9}}
# Table 5 (ResNet-18, 2/3/4 bits): quantizer variants.
PAPER_TABLE5 = {"symmetric": {"4": 69.1, "3": 68.5, "2": 65.1},
                "asymmetric": {"4": 69.2, "3": 68.5, "2": 65.2},
                "asymmetric_round": {"4": 69.2, "3": 68.6, "2": 65.2}}

BIT_LABELS = {"4": "4", "3": "3", "2": "2", "1": "1", "rand": "Rand."}      # row labels (cells)
BIT_COLUMNS = {"4": "4", "3": "3", "2": "2", "1": "1", "rand": "Rand"}        # column-name labels


def check_column_name(name: str) -> str:
    """`name` unchanged if the MLflow table view can show its column; else a ValueError naming it."""
    bad = [c for c in UNSAFE_IN_COLUMN_NAMES if c in name]
    if bad:
        raise ValueError(f"table column {name!r} holds {''.join(bad)!r}, which the MLflow UI's table view reads "
                         f"as a path and shows empty; name the column without '.', '[' or ']'.")
    return name


def format_cell(value: str | Cell) -> str:
    """A cell as shown: figures with one decimal, a missing figure as "–", labels as they are."""
    if value is None:
        return MISSING
    if isinstance(value, MeanStd):
        return f"{value.mean:.1f} ± {value.std:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def over_seeds(runs: list[PerBit]) -> PerBit:
    """One run's figures as they are; several runs' (seeds) as MeanStd per bit key they all have."""
    import statistics
    if len(runs) == 1:
        return runs[0]
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: MeanStd(statistics.fmean(float(r[k]) for r in runs), statistics.stdev(float(r[k]) for r in runs),
                       len(runs)) for k in keys}


@dataclass
class Table:
    """A result table: a title, column names, rows of cells (str for labels, float or None for figures)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[str | Cell]] = field(default_factory=list)
    note: str = ""

    def __post_init__(self) -> None:
        for column in self.columns:
            check_column_name(column)

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if v is None else format_cell(v) for v in row])
        return out.getvalue()

    def to_dict(self) -> dict[str, list[str]]:
        """Column name -> cells as shown (one decimal, "–" for missing; never null), the form
        `mlflow.log_table(data=...)` takes."""
        return {c: [format_cell(row[i]) for row in self.rows] for i, c in enumerate(self.columns)}


def _pair(label: str) -> list[str]:
    return [f"{label} (ours)", f"{label} ({PAPER})"]


def table7(outcomes: Outcomes, architectures: list[str], bit_keys: list[str]) -> Table:
    """Table 7: architecture x {bits..., Rand.} x {Indep., Stage II, Stage III}, AdaBits from the paper."""
    columns = ["Architecture", "Bits", *_pair("Independent"), f"AdaBits ({PAPER})", *_pair("Stage II"),
               *_pair("Stage III")]
    table = Table("table7", "Table 7: top-1 (%) per bit-width, Independent vs. Bit-Mixer Stage II and III",
                  columns, note=f"Columns marked ({PAPER}) are the paper's ImageNet figures (AdaBits: [21]); toy "
                                f"architectures are shown beside the paper's nearest network. Independent = one "
                                f"network per fixed bit-width; Rand. = every layer's bit-width redrawn at every "
                                f"batch; {MISSING} = no figure.")
    for arch in architectures:
        ref = PAPER_COUNTERPART.get(arch, arch)
        paper = PAPER_TABLE7.get(ref, {})
        label = arch if ref == arch else f"{arch} (paper: {PAPER_NAMES[ref]})"
        for key in [*bit_keys, "rand"]:
            indep = outcomes.get((arch, f"independent_{key}", "independent"), {}).get(key)
            table.rows.append([
                label, BIT_LABELS[key],
                indep, paper.get("indep", {}).get(key), paper.get("adabits", {}).get(key),
                outcomes.get((arch, "main", "two"), {}).get(key), paper.get("two", {}).get(key),
                outcomes.get((arch, "main", "three"), {}).get(key), paper.get("three", {}).get(key),
            ])
    return table


def _rows(table: Table, specs: list[tuple[list[str], PerBit | None, dict]], keys: list[str]) -> Table:
    for labels, ours, paper in specs:
        row: list[str | Cell] = list(labels)
        for key in keys:
            row += [None if ours is None else ours.get(key), paper.get(key)]
        table.rows.append(row)
    return table


def _bit_columns(keys: list[str], labels: dict[str, str] | None = None) -> list[str]:
    cols: list[str] = []
    for key in keys:
        cols += _pair((labels or BIT_COLUMNS)[key])
    return cols


def table1(outcomes: Outcomes, arch: str) -> Table:
    keys = ["4", "3", "2", "rand"]
    t = Table("table1", f"Table 1: {arch}, Stage III with and without Transitional BN (top-1 %)",
              ["Bit-Mixer", *_bit_columns(keys)])
    return _rows(t, [(["w/o Transitional BN"], outcomes.get((arch, "no_transitional_bn", "three")),
                      PAPER_TABLE1["no_transitional_bn"]),
                     (["with Transitional BN"], outcomes.get((arch, "main", "three")),
                      PAPER_TABLE1["transitional_bn"])], keys)


def table2(outcomes: Outcomes, arch: str, main_teacher: str | dict[str, str]) -> Table:
    """`main_teacher`: the main chain's teacher, or one per stage ({"two": "stage_one", "three": "fp32"})."""
    main = main_teacher if isinstance(main_teacher, dict) else {"two": main_teacher, "three": main_teacher}
    keys = ["4", "3", "2", "rand"]
    t = Table("table2", f"Table 2: {arch} with and without distillation (top-1 %)",
              ["Method", "Teacher", *_bit_columns(keys)])
    teacher_label = {"none": "-", "stage_one": "Stage I", "fp32": "FP32"}
    specs = []
    for stage, stage_label in (("two", "Ours-Stage II"), ("three", "Ours-Stage III")):
        for teacher in ("none", "stage_one", "fp32"):
            variant = "main" if teacher == main[stage] else f"teacher_{teacher}"
            specs.append(([stage_label, teacher_label[teacher]], outcomes.get((arch, variant, stage)),
                          PAPER_TABLE2[stage][teacher]))
    return _rows(t, specs, keys)


def table3(outcomes: Outcomes, arch: str) -> Table:
    keys = ["4", "3", "2", "1"]
    t = Table("table3", f"Table 3: {arch}, 4-3-2-1 bit quantization (top-1 %)", ["Method", *_bit_columns(keys)])
    indep = {k: v for b in keys
             for k, v in outcomes.get((arch, f"independent_{b}", "independent"), {}).items() if k == b}
    return _rows(t, [(["Independent"], indep or None, PAPER_TABLE3["independent"]),
                     (["Adabits [21]"], None, PAPER_TABLE3["adabits"]),
                     (["Ours (Stage II), bits 4-3-2"], outcomes.get((arch, "main", "two")), PAPER_TABLE3["two_432"]),
                     (["Ours (Stage II), bits 4-3-2-1"], outcomes.get((arch, "bits_4321", "two")),
                      PAPER_TABLE3["two_4321"])], keys)


def table4(outcomes: Outcomes, arch: str) -> Table:
    keys = ["4", "3", "2", "rand"]
    labels = {"4": "4", "3": "3", "2": "A2 W1*", "rand": "Rand"}
    t = Table("table4", f"Table 4: {arch}, activations {{2,3,4}} / weights {{1,3,4}} (top-1 %)",
              ["Method", *_bit_columns(keys, labels)],
              note="A2 W1* = the paper's 1.5* column, binary-ternary: 2-bit (ternary) activations with "
                   "1-bit (binary) weights.")
    return _rows(t, [(["Adabits [21]"], None, PAPER_TABLE4["adabits"]),
                     (["Ours - Stage II"], outcomes.get((arch, "ternary_binary", "two")), PAPER_TABLE4["two"]),
                     (["Ours - Stage III"], outcomes.get((arch, "ternary_binary", "three")), PAPER_TABLE4["three"])],
                 keys)


def table5(outcomes: Outcomes, arch: str) -> Table:
    keys = ["4", "3", "2"]
    t = Table("table5", f"Table 5: {arch}, quantizer variants after Stage II (top-1 %)",
              ["Quantization method", *_bit_columns(keys)])
    return _rows(t, [(["symmetric"], outcomes.get((arch, "main", "two")), PAPER_TABLE5["symmetric"]),
                     (["asymmetric"], outcomes.get((arch, "asymmetric", "two")), PAPER_TABLE5["asymmetric"]),
                     (["asymmetric with round"], outcomes.get((arch, "asymmetric_round", "two")),
                      PAPER_TABLE5["asymmetric_round"])], keys)


# Table 6 (ResNet-18): Bit-Mixer at fixed and at fractional average bit-widths (section 4.2 sub-nets).
PAPER_TABLE6 = {"4": 69.1, "3.5": 69.2, "3": 68.6, "2.5": 66.4, "2": 64.4}
FRACTIONS = {".25": "¼", ".5": "½", ".75": "¾"}


def _bits_label(bits: str) -> str:
    """A bit-width as a column label without "." (the MLflow table view): "3.5" -> "3½"."""
    whole, dot, fraction = bits.partition(".")
    return whole + FRACTIONS.get(dot + fraction, ("," + fraction) if fraction else "")


def table6(outcomes: Outcomes, subnets: dict[str, dict[str, float]], architectures: list[str],
           bit_keys: list[str]) -> Table:
    """Table 6: per architecture, Stage III at its highest and lowest fixed bit-width and, between them, the
    best of the top-k sub-nets of the Hessian search at each average bit-width (section 4.2), above the mean
    of random assignments of the same total bits. `subnets`: architecture -> subnets/avg<b>/... metrics."""
    budgets = sorted({k.split("/")[1].removeprefix("avg") for s in subnets.values() for k in s}, key=float,
                     reverse=True)
    high, low = bit_keys[0], bit_keys[-1]
    keys = [high, *[b for b in budgets if b not in (high, low)], low]
    t = Table("table6", "Table 6: top-1 (%) at average bit-widths, sub-nets found by the Hessian search",
              ["Architecture", "Sub-nets", *_bit_columns(keys, {k: _bits_label(k) for k in keys})],
              note=f"Fractional bit-widths: the best of the top-3 assignments by the per-layer Hessian "
                   f"eigenvalue score, and the mean of 3 random assignments of the same total bits; "
                   f"whole bit-widths: every layer alike. {MISSING} = no figure.")
    for arch in architectures:
        fixed = outcomes.get((arch, "main", "three")) or {}
        found = subnets.get(arch, {})
        searched = {b: found.get(f"subnets/avg{b}/top_best_top1") for b in budgets}
        random = {b: found.get(f"subnets/avg{b}/random_mean_top1") for b in budgets}
        for label, figures in (("top-k by Hessian score", {**searched, high: fixed.get(high), low: fixed.get(low)}),
                               ("random, same total bits", random)):
            row: list[str | Cell] = [arch, label]
            for key in keys:
                row += [figures.get(key), PAPER_TABLE6.get(key) if label.startswith("top") else None]
            t.rows.append(row)
    return t


def build_tables(outcomes: Outcomes, *, architectures: list[str], bit_keys: list[str], ablation_arch: str,
                 ablations: dict[str, bool], main_teacher: str | dict[str, str],
                 subnets: dict[str, dict[str, float]] | None = None) -> list[Table]:
    """Table 7 always; Table 6 when the sub-net search ran; Tables 1-5 for the ablations that were switched on
    (`AblationsSpec` field names)."""
    tables = [table7(outcomes, architectures, bit_keys)]
    if subnets:
        tables.append(table6(outcomes, subnets, architectures, bit_keys))
    if ablations.get("no_transitional_bn"):
        tables.append(table1(outcomes, ablation_arch))
    if ablations.get("teachers"):
        tables.append(table2(outcomes, ablation_arch, main_teacher))
    if ablations.get("bits_4321"):
        tables.append(table3(outcomes, ablation_arch))
    if ablations.get("ternary_binary"):
        tables.append(table4(outcomes, ablation_arch))
    if ablations.get("quantizers"):
        tables.append(table5(outcomes, ablation_arch))
    return tables


def render_markdown(tables: list[Table]) -> str:
    return "\n".join(t.to_markdown() for t in tables)
