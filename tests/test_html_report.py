"""The HTML report (``graphopt.html_report``): every number in its tables is the JSON
report's (each cell names its JSON pointer and value, read back here with the standard
library's HTML parser), every chart has drawn shapes, nothing is fetched or run; the
CLI writes it for ``--report x.html`` and ``graphopt report R.json -o R.html``, and
refuses bad paths; headless Chromium renders the digits CNN's planner report and a
compressed transformer's with every plot drawn and no error."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

import graphopt
from graphopt import html_report
from graphopt.cli import main
from graphopt.html_parts import UNITS
from tests import browser, zoo
from tests.digits import digits_cnn, digits_data, digits_mlp
from tests.helpers import bert_token_feeds

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"
SHAPES = {"rect", "circle", "path", "polyline"}


# ============================================================================ reading pages
class Page(HTMLParser):
    """What a rendered page holds: numeric cells (``data-src``/``data-value``/
    ``data-unit`` and the text shown), table ids and row keys, per ``<svg>`` its drawn
    shapes, the sections, and every tag and attribute (to find scripts and links)."""

    def __init__(self, text: str):
        super().__init__()
        self.cells: list[dict] = []
        self.rows: dict[str, list[str]] = {}
        self.plots: list[int] = []
        self.sections: dict[str, str] = {}
        self.tags: list[tuple[str, dict]] = []
        self._cell: dict | None = None
        self._table: str | None = None
        self._section: str | None = None
        self._in_svg = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = ""
        elif tag == "table":
            self._table = attrs["id"]
            self.rows[self._table] = []
        elif tag == "tr" and "data-key" in attrs:
            self.rows[self._table].append(attrs["data-key"])
        elif tag == "td" and "data-src" in attrs:
            self._cell = {**attrs, "text": ""}
        elif tag == "svg":
            self._in_svg = True
            self.plots.append(0)
        elif self._in_svg and tag in SHAPES:
            self.plots[-1] += 1

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        elif tag == "svg":
            self._in_svg = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._section is not None:
            self.sections[self._section] += data


def resolve(report: dict, pointer: str):
    """The value at the RFC 6901 JSON ``pointer`` in ``report``."""
    value = report
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def check_numbers(page: Page, report: dict) -> int:
    """Every numeric cell's value is the report's number at its pointer, and its text
    shows that number (to the digits shown). Returns how many cells were checked."""
    for cell in page.cells:
        want = resolve(report, cell["data-src"])
        assert json.loads(cell["data-value"]) == want, cell
        factor = UNITS[cell["data-unit"]][0]
        shown = Decimal(cell["text"].replace(",", ""))
        half_digit = Decimal(1).scaleb(shown.as_tuple().exponent) / 2
        assert abs(float(shown) - want * factor) <= float(half_digit) * 1.0001 + 1e-12, cell
    return len(page.cells)


def check_self_contained(text: str, page: Page) -> None:
    """No script, no stylesheet or image fetched, no address anywhere on the page."""
    assert not [t for t, _ in page.tags if t in ("script", "link", "img", "iframe")]
    assert not [a for _, attrs in page.tags for k, a in attrs.items()
                if k in ("src", "href") and not a.startswith("#")]
    assert "http:" not in text and "https:" not in text and "url(" not in text


def check_page(report: dict) -> Page:
    """Render ``report`` and check numbers, plots and self-containment; the page."""
    text = html_report.render(report)
    page = Page(text)
    assert check_numbers(page, report) > 20
    assert page.plots and all(n > 0 for n in page.plots), page.plots
    check_self_contained(text, page)
    assert list(page.sections) == [key for key, *_ in html_report.SECTIONS]
    return page


def as_json(report: dict) -> dict:
    """The report as ``--report R.json`` writes it and reads back."""
    return json.loads(json.dumps(report, default=float))


# ============================================================================ reports
@pytest.fixture(scope="module")
def lossless() -> dict:
    return as_json(graphopt.optimize(EXAMPLE).report)


@pytest.fixture(scope="module")
def transformer() -> dict:
    """bert_tiny with its FFN pruned under a mean-cosine budget, on random tokens."""
    calibration = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=6, batch=4, seed=1)
    validation = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=2, batch=3, sequence=11, seed=2)
    return as_json(graphopt.optimize(zoo.bert_tiny(), schemes={"prune": "ffn"},
                                     calibration=calibration, validation=validation,
                                     metric="mean-cosine", tolerance=0.97).report)


@pytest.fixture(scope="module")
def small_plan() -> dict:
    """The planner on the digits MLP among int8 and fp16, for size (seconds)."""
    xtr, _, _, _ = digits_data()
    return as_json(graphopt.optimize(
        digits_mlp(), goal="size", plan=True, schemes={"quantize": ["int8", "fp16"]},
        calibration={"input": xtr[:200].reshape(-1, 64)}).report)


# ============================================================================ the page
def test_lossless_page_numbers_equal_the_json(lossless):
    page = check_page(lossless)
    assert page.rows["before-after"] == ["nodes", "params", "weight_bytes", "flops",
                                    "estimated_latency_s", "peak_activation_bytes"]
    ops = list(dict.fromkeys([*lossless["input"]["ops"], *lossless["output"]["ops"]]))
    assert page.rows["op-table"] == ops
    assert page.rows["trace-table"] == [str(i) for i in range(len(lossless["trace"]))]
    srcs = {c["data-src"] for c in page.cells}
    assert {f"/input/op_costs/{op}/flops" for op in lossless["input"]["ops"]} <= srcs
    assert "/output/estimated_latency_s" in srcs and "/trace/0/seconds" in srcs
    assert len(page.plots) == 4  # nodes, FLOPs and est. time per op type; the trace
    for absent in ("compression", "plan", "artifact"):
        assert page.sections[absent].strip(), absent  # each says why it is empty
    assert "did not run" in page.sections["plan"]
    assert "lossless" in page.sections["accuracy"]


def test_compressed_transformer_page_shows_every_site(transformer):
    page = check_page(transformer)
    info = transformer["compression"]["passes"]["prune-ffn"]
    assert info["status"] == "changed"
    assert page.rows["sites-prune-ffn"] == list(info["sites"])
    srcs = {c["data-src"] for c in page.cells}
    for site in info["sites"]:
        key = site.replace("~", "~0").replace("/", "~1")
        assert f"/compression/passes/prune-ffn/sites/{key}/damage_alone" in srcs
    assert {"/verification/score", "/verification/budget",
            "/compression/passes/prune-ffn/cost/flops_after"} <= srcs
    assert html_report.sections(transformer) == {
        "summary": True, "op-types": True, "trace": True, "compression": True,
        "plan": False, "accuracy": True, "artifact": False}


def test_planner_page_lists_every_candidate(small_plan):
    page = check_page(small_plan)
    plan = small_plan["plan"]
    assert page.rows["candidates"] == [c["label"] for c in plan["candidates"]]
    srcs = {c["data-src"] for c in page.cells}
    for i, cand in enumerate(plan["candidates"]):
        assert f"/plan/candidates/{i}/size_bytes" in srcs
        assert (f"/plan/candidates/{i}/measured_latency_s" in srcs) == \
            (cand["measured_latency_s"] is not None)
    assert plan["chosen"] in page.sections["plan"]


def test_quantized_page_shows_the_quantizer():
    """The digits CNN in int8: the layers quantized, those skipped where the cost model
    says int8 does not pay (the first convolution, on a CPU without VNNI), and the
    variants --measure times (given here: timing decides what --measure keeps)."""
    xtr, _, _, _ = digits_data()
    report = as_json(graphopt.optimize(digits_cnn(), quantize="int8",
                                       calibration={"input": xtr[:200]}).report)
    info = report["compression"]["passes"]["quantize-int8"]
    assert info["status"] == "changed" and any(e["changed"] for e in info["sites"].values())
    assert info["refused"]  # the first convolution (or more, by the host's cost model)
    info["timing"] = {"ms": {"float": 1.25, "all": 0.75}, "kept": "all"}  # as --measure
    page = check_page(report)
    srcs = {c["data-src"] for c in page.cells}
    assert {"/compression/passes/quantize-int8/score",
            "/compression/passes/quantize-int8/timing/ms/float"} <= srcs
    assert page.rows["sites-quantize-int8"] == list(info["sites"])
    for site in info["refused"]:
        assert f"refused: {site}: {info['refused'][site]}" in page.sections["compression"]
    assert "kept: all" in page.sections["compression"]


def test_a_page_is_deterministic_and_escapes_text(lossless):
    report = json.loads(json.dumps(lossless))
    assert html_report.render(report) == html_report.render(json.loads(json.dumps(report)))
    report["trace"][0]["pass_name"] = "<script>alert('x')</script>"
    report["trace"][0]["reason"] = "a & b <b>"
    text = html_report.render(report)
    assert "<script" not in text and "&lt;script&gt;" in text and "a &amp; b &lt;b&gt;" in text
    Page(text)


def test_an_older_report_without_op_costs_still_renders(lossless):
    report = json.loads(json.dumps(lossless))
    for side in ("input", "output"):
        del report[side]["op_costs"]
    page = check_page(report)
    assert "no FLOPs or estimated time per op type" in page.sections["op-types"]
    assert len(page.plots) == 2


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                    reason="Apache TVM is not installed (pip install 'graphopt[tvm]')")
def test_compiled_artifact_section(tmp_path):
    """A TVM library for this CPU, run against ONNX Runtime and timed: its check and its
    latency beside ORT's."""
    report = as_json(graphopt.optimize(EXAMPLE, target="x86", output=tmp_path / "x86").report)
    assert report["artifact"]["ok"] is True
    page = check_page(report)
    srcs = {c["data-src"] for c in page.cells}
    assert {"/artifact/max_abs_diff", "/artifact/latency/artifact_s",
            "/artifact/latency/ort_s"} <= srcs
    assert "Latency: artifact and ONNX Runtime" in html_report.render(report)
    assert html_report.sections(report)["artifact"]


# ============================================================================ the CLI
def cli(*args, cwd: Path | None = None):
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "200"})
    finally:
        os.chdir(old)


def test_optimize_writes_html_for_an_html_name_and_report_renders_json(tmp_path):
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "a.onnx", "--report",
                 tmp_path / "out" / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    result = cli("optimize", EXAMPLE, "-o", tmp_path / "b.onnx", "--report",
                 tmp_path / "out" / "r.HTML")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "r.HTML").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    page = Page(text)
    # the same model and cost model: the same summaries (timings differ between runs)
    for cell in page.cells:
        if cell["data-src"].startswith(("/input/", "/output/")):
            assert json.loads(cell["data-value"]) == resolve(report, cell["data-src"])
    result = cli("report", tmp_path / "out" / "r.json", "-o", tmp_path / "r.html", "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)
    assert written["sections"] == html_report.sections(report)
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert written["bytes"] == len(text.encode()) and text == html_report.render(report)
    check_numbers(Page(text), report)
    assert not [p for p in tmp_path.rglob(".go-*")]  # no temporary left behind


def test_report_command_refuses_bad_input_and_output(tmp_path, lossless):
    good = tmp_path / "r.json"
    good.write_text(json.dumps(lossless))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text(json.dumps({"input": {}}))
    shutil.copy(good, tmp_path / "same.html")
    cases = [((tmp_path / "missing.json", "o.html"), "no such file"),
             ((tmp_path / "bad.json", "o.html"), "not valid JSON"),
             ((tmp_path / "list.json", "o.html"), "not a graphopt report"),
             ((tmp_path / "other.json", "o.html"), "no output, trace, verification"),
             ((tmp_path, "o.html"), "is a folder"),
             ((good, "o.json"), "must end in .html or .htm"),
             ((tmp_path / "same.html", tmp_path / "same.html"), "would overwrite the input"),
             ((good, tmp_path / "good.json" / "o.html"), None)]
    (tmp_path / "good.json").write_text("a file where a folder should be")
    for (source, out), message in cases:
        result = cli("report", source, "-o", out, cwd=tmp_path)
        assert result.exit_code == 2, (source, out, result.output)
        assert message is None or message in result.output, result.output
    assert not (tmp_path / "o.html").exists() and not (tmp_path / "o.json").exists()
    assert (tmp_path / "same.html").read_text() == good.read_text()
    assert cli("report", good).exit_code == 2  # -o is required


def test_an_html_report_may_not_overwrite_an_input(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copy(EXAMPLE, model)
    (tmp_path / "r.html").symlink_to(model)
    result = cli("optimize", model, "-o", tmp_path / "out.onnx", "--report",
                 tmp_path / "r.html")
    assert result.exit_code == 2 and "would overwrite the input model" in result.output
    assert model.read_bytes() == EXAMPLE.read_bytes() and not (tmp_path / "out.onnx").exists()


# ============================================================================ Chromium
@pytest.fixture(scope="module")
def rendered(tmp_path_factory, digits_planned):
    """The digits CNN planned through the CLI (--goal latency, as in test_planner) and
    bert_tiny with its FFN pruned: each JSON report, and its page rendered by Chromium."""
    missing = browser.why_unavailable()
    if missing:
        pytest.skip(missing)
    folder = tmp_path_factory.mktemp("html")
    result, _, _, planned = digits_planned
    assert result.exit_code == 0, result.output
    shutil.copy(planned / "report.json", folder / "plan.json")
    out = {}
    for name in ("plan", "transformer"):
        if name == "transformer":
            calibration = bert_token_feeds(zoo.BERT_TINY_VOCAB, count=6, batch=4, seed=1)
            report = graphopt.optimize(zoo.bert_tiny(), schemes={"prune": "ffn"},
                                       calibration=calibration, metric="mean-cosine",
                                       tolerance=0.97).report
            (folder / "transformer.json").write_text(json.dumps(report, default=float))
        result = cli("report", folder / f"{name}.json", "-o", folder / f"{name}.html")
        assert result.exit_code == 0, result.output
        report = json.loads((folder / f"{name}.json").read_text())
        out[name] = (report, folder / f"{name}.html",
                     browser.render(folder / f"{name}.html", folder / f"{name}.png"))
    return out


@pytest.mark.parametrize("name", ["plan", "transformer"])
def test_chromium_draws_every_plot(rendered, name):
    report, page_path, seen = rendered[name]
    assert seen["errors"] == [] and seen["requests"] == []
    assert seen["plots"], "no plot"
    for plot in seen["plots"]:
        assert plot["width"] > 0 and plot["height"] > 0, plot
        assert plot["shapes"] > 0 and plot["visible"] > 0, plot
    page = check_page(report)  # the numbers shown are the JSON's
    assert len(seen["plots"]) == len(page.plots)
    labels = {p["label"] for p in seen["plots"]}
    if name == "plan":
        assert "Candidates: score against latency" in labels
    else:
        assert "prune-ffn: damage alone per changed site" in labels
    assert "Accuracy of the result against the budget" in labels, \
        report.get("plan", {}).get("why")  # (drawn where the result is lossy)
    assert page_path.with_suffix(".png").stat().st_size > 10_000
