"""Sweeps: grid expansion and its errors, the Pareto front and its chart, and `sweep` end to end on the tiny model."""

from __future__ import annotations

import json
import sys

import pytest

from workbench.cli import main
from workbench.core.errors import WorkbenchError
from workbench.report import charts
from workbench.run import sweep
from workbench.run.results import MB, Result

FAST = ["--max-length", "128", "--max-tokens", "256", "--decode-tokens", "0"]
PROTOCOL = {"text": "pydoc-topics", "n_tokens": 255, "max_length": 128, "stride": 127}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def point(label: str, mb: float | None, ppl: float | None, error: str | None = None, kl: float | None = None) -> Result:
    return Result(
        model="tiny",
        method=label.split("(")[0],
        family="test",
        bits=4,
        params={"bits": 4, "group_size": 64},
        device="cpu",
        label=label,
        ppl=ppl,
        kl_mean=kl,
        weight_bytes=None if mb is None else int(mb * MB),
        bits_per_weight=4.25,
        protocol=PROTOCOL,
        error=error,
    )


# ---------------------------------------------------------------------------- grids


def test_a_grid_is_the_cartesian_product_of_its_lists():
    cells = sweep.expand_grid("rtn:bits=2,3:group_size=32,64")
    assert [c.text for c in cells] == [
        "rtn:bits=2:group_size=32",
        "rtn:bits=2",
        "rtn:bits=3:group_size=32",
        "rtn:bits=3",
    ]
    assert all(c.method.name == "rtn" for c in cells) and cells[0].params["bits"] == 2
    assert [c.text for c in sweep.expand_grid("bnb-nf4")] == ["bnb-nf4"]


def test_a_cell_named_twice_is_measured_once():
    notes = []
    cells = sweep.expand(["hqq:bits=2,4", "hqq", "fp32", "hqq:bits=2"], notes.append)
    assert [c.text for c in cells] == ["hqq:bits=2", "hqq", "fp32"]  # hqq:bits=4 is hqq: 4 is its default
    assert len(notes) == 2 and "measuring it once" in notes[0]


@pytest.mark.parametrize(
    "grids,message",
    [
        ([], "no grid given"),
        ([""], "no method named"),
        (["fp32", "rtn:bits=2,5"], "--grid 'rtn:bits=2,5': rtn: bits=5 is not supported"),
        (["rtn:bits=2,,4"], "has an empty value"),
        (["rtn:bits=2:bits=3"], "bits is set twice"),
        (["rtn:bits"], "settings are written key=value"),
        (["nosuch:bits=2,3"], "unknown method 'nosuch'"),
        (["hqq:group_size=32,big"], "group_size='big' is not a int"),
    ],
)
def test_a_bad_grid_is_an_error_naming_the_grid_and_the_value(grids, message):
    with pytest.raises(WorkbenchError) as caught:
        sweep.expand(grids, lambda m: None)
    assert message in str(caught.value)


# ---------------------------------------------------------------------------- the Pareto front


def test_the_front_keeps_the_points_nothing_beats_and_both_of_a_tie():
    a, tie = point("a", 10, 20.0), point("a-again", 10, 20.0)
    b, worse, heavier, best = (point("b", 20, 15.0), point("c", 20, 25.0), point("d", 30, 15.0), point("e", 40, 10.0))
    failed, unmeasured = point("f", 5, 1.5, error="crashed"), point("g", 5, None)
    front = charts.pareto_front([worse, best, tie, heavier, failed, a, unmeasured, b])
    assert [r.label for r in front] == [
        "a-again",
        "a",
        "b",
        "e",
    ]  # by weight; c and d are beaten, f and g have no point


def test_the_kl_front_uses_kl_and_skips_results_without_it():
    light, heavy, no_kl = (point("light", 10, 30.0, kl=0.5), point("heavy", 20, 20.0, kl=0.6), point("fp32", 40, 19.0))
    assert [r.label for r in charts.pareto_front([light, heavy, no_kl], "ppl")] == ["light", "heavy", "fp32"]
    assert [r.label for r in charts.pareto_front([light, heavy, no_kl], "kl")] == [
        "light"
    ]  # heavy: more bytes, more KL
    with pytest.raises(WorkbenchError, match="--metric 'loss': choose one of ppl, kl"):
        charts.pareto_front([light], "loss")


def test_the_chart_marks_the_front_with_its_staircase_and_hover_says_each_points_settings():
    results = [
        point("int2", 10, 900.0),
        point("int4", 20, 30.0),
        point("int4(group)", 25, 35.0),
        point("fp32", 80, 25.0),
    ]
    fig = charts.pareto_chart(results)
    (trace,) = fig.data
    assert list(trace.x) == [10 * 1.0, 20.0, 25.0, 80.0] and list(trace.y) == [900.0, 30.0, 35.0, 25.0]
    assert list(trace.text) == ["int2", "int4", "", "fp32"]  # the front is labelled, the beaten point is not
    assert trace.marker.color[2] != trace.marker.color[0]
    assert (
        "int4(group)" in trace.hovertext[2]
        and "group_size=64" in trace.hovertext[2]
        and "25.00 MB" in trace.hovertext[2]
    )
    assert "dominated" in trace.hovertext[2] and "on the Pareto front" in trace.hovertext[0]
    corners = [(s.x0, s.y0, s.x1, s.y1) for s in fig.layout.shapes]
    assert corners == [(10, 900, 20, 900), (20, 900, 20, 30), (20, 30, 80, 30), (80, 30, 80, 25)]
    assert fig.layout.yaxis.type == "log"  # 900 / 25 > 20
    assert fig.layout.xaxis.title.text == "weight memory (MB of stored weights)"
    assert "3 of 4 points" in fig.layout.title.text and "255 tokens" in fig.layout.title.text


def test_the_report_ends_with_the_trade_off_chart(tmp_path):
    results = [point("int4", 20, 30.0), point("int8", 40, 26.0), point("fp32", 80, 25.0)]
    figures = charts.all_charts(results)
    assert len(figures) == 5 and figures[-1].layout.title.text.startswith("Perplexity vs weight memory, Pareto front")
    charts.write_report(results, tmp_path / "report.html", metric="kl")
    assert (
        "KL divergence vs weight memory, Pareto front in red (0 of 0 points" in (tmp_path / "report.html").read_text()
    )


# ---------------------------------------------------------------------------- the command


def test_sweep_runs_the_grid_reuses_finished_cells_and_prints_the_front(capsys, tiny_folder, tmp_path):
    argv = [
        "sweep",
        "--model",
        str(tiny_folder),
        "--grid",
        "bnb-nf4:double_quant=true,false",
        "--grid",
        "fp32",
        "--grid",
        "bnb-int8",
        "--grid",
        "bnb-nf4",
        "--in-process",
        "--out",
        str(tmp_path),
        *FAST,
    ]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "bnb-nf4 is a cell of more than one grid" in err
    rows = [
        Result.from_dict({k: v for k, v in r.items() if k != "ms_per_token"})
        for r in json.loads((tmp_path / "results.json").read_text())
    ]
    assert [r.label for r in rows] == ["bnb-nf4", "bnb-nf4(double_quant=False)", "fp32", "bnb-int8"]
    assert all(r.error is None for r in rows) and rows[1].weight_bytes != rows[0].weight_bytes
    lines = out[out.index("Pareto front") : out.index("cells reused")].splitlines()[1:-1]
    assert [line.split()[0] for line in lines] == [r.label for r in charts.pareto_front(rows)]
    assert "0 of 4 cells reused from the history, 4 run now." in out
    assert "Pareto front in red" in (tmp_path / "report.html").read_text()
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 4

    code, out, err = run(capsys, *argv)
    assert code == 0 and "4 of 4 cells reused from the history, 0 run now." in out
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--grid", "fp32", "--address", "auto"], "--address: only with --executor ray"),
        (["--grid", "fp32", "--ray-cpus", "2"], "--ray-cpus: only with --executor ray"),
        (
            ["--grid", "fp32", "--executor", "ray", "--jobs", "2", "--in-process"],
            "--jobs, --in-process: only with --executor local",
        ),
        (
            ["--grid", "fp32", "--executor", "ray", "--address", "auto", "--ray-cpus", "2"],
            "an existing Ray cluster (auto) has the CPUs",
        ),
        (["--grid", "fp32", "--grid", "rtn:bits=2,5"], "--grid 'rtn:bits=2,5': rtn: bits=5 is not supported"),
        (["--grid", "fp32", "--metric", "kl", "--grid", "rtn:group_size=32,"], "has an empty value"),
        (["--grid", "fp32", "--executor", "ray", "no-ray"], "pip install 'quantization-workbench[cluster]'"),
    ],
)
def test_bad_sweep_options_give_one_clear_message_before_any_work(
    capsys, monkeypatch, tiny_folder, tmp_path, argv, message
):
    if "no-ray" in argv:
        argv = argv[:-1]
        monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like to `import ray`
    code, out, err = run(capsys, "sweep", "--model", str(tiny_folder), "--out", str(tmp_path / "o"), *FAST, *argv)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
