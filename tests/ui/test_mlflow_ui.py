"""The researcher's view, in a real browser: a real `mlflow server` on 127.0.0.1 holding a finished small
run (recorded by the pipeline's own logging functions, see finished_run.py), opened in Debian's headless
Chromium through Playwright.

- Table 7's table view shows every column, each with figures (a column name with "." would be blank).
- A stage run's per-bit chart has one point per evaluated epoch, not a single dot.
- The analysis figures load as images.
- The pipeline run's Overview shows Table 7 and the headline figures, in the model-training view.
- MLflow's comparison page puts Stage II, Stage III and the Independent network side by side.

Screenshots are kept under runs/test-artifacts/ui/ (and the test's tmp folder).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.servers import MLflowServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("BITMIXER_CHROMIUM", "/usr/bin/chromium"))  # Debian's package (infra/setup.sh)
SCREENSHOTS = ROOT / "runs" / "test-artifacts" / "ui"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEW = "workflowType=machine_learning"  # the UI's model-training view, as the pipeline's printed link opens it
TIMEOUT_MS = 60_000
FIGURES = ["fig3_tbn_variance.png", "fig4_top1_vs_average_bits.png", "fig4_top1_vs_bitops.png",
           "fig5_layer_eigenvalues.png", "fig6_weight_distributions.png", "fig7_step_sizes.png"]


class Browser:
    """One Chromium profile; each view opens in a page of its own and can be kept as a screenshot."""

    def __init__(self, context, uri: str, ids: dict[str, str], shots: Path):
        self.context, self.uri, self.ids, self.shots = context, uri, ids, shots

    def open(self, path: str):
        """A page of the experiment (`runs`, `runs/<id>/...`) in the model-training view."""
        return self.open_address(f"experiments/{self.ids['experiment']}/{path}")

    def open_address(self, address: str):
        """Any page of the UI by its address after `#/`, in the model-training view."""
        page = self.context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        separator = "&" if "?" in address else "?"
        page.goto(f"{self.uri}/#/{address}{separator}{VIEW}")
        return page

    def close_assistant(self, page) -> None:
        """Close the UI's chat panel, if it is open, so that a screenshot shows the page at full width."""
        close = page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()

    def screenshot(self, page, name: str) -> Path:
        page.wait_for_timeout(1000)  # let charts finish their transition
        path = self.shots / name
        page.screenshot(path=str(path), full_page=True)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / name)
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM} is missing); infra/setup.sh installs it "
                    f"with apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package is missing; infra/setup.sh installs the test extra")
    from tests.ui.finished_run import record_finished_run

    work = tmp_path_factory.mktemp("ui")
    shots = work / "screenshots"
    shots.mkdir()
    with MLflowServer(work / "server") as server:
        ids = record_finished_run(server.uri, work / "run")
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(work / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
                viewport={"width": 1600, "height": 1100})
            try:
                yield Browser(context, server.uri, ids, shots)
            finally:
                context.close()


def _table_cells(page) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the table the artifact viewer draws (div grid with ARIA roles, or a table)."""
    return page.evaluate("""() => {
        const header = [...document.querySelectorAll('[role=columnheader], th')].map(e => e.innerText.trim());
        const rows = [...document.querySelectorAll('[role=row], tr')]
            .map(r => [...r.querySelectorAll('[role=cell], [role=gridcell], td')].map(c => c.innerText.trim()))
            .filter(cells => cells.length > 0);
        return [header, rows];
    }""")


def test_table7_view_shows_every_column_with_figures(browser):
    """Every column of Table 7's table view has a header and, in the first row, a figure with one decimal;
    rows of the two architectures can be told apart; a missing figure is "–", never blank or null."""
    page = browser.open(f"runs/{browser.ids['pipeline']}/artifacts/tables/table7.json")
    page.get_by_text("Stage III (paper, ImageNet)").first.wait_for()
    header, rows = _table_cells(page)
    browser.close_assistant(page)
    page.set_viewport_size({"width": 2200, "height": 800})  # wide enough that the picture holds all 9 columns
    browser.screenshot(page, "table7_table_view.png")
    assert header == ["Architecture", "Bits", "Independent (ours)", "Independent (paper, ImageNet)",
                      "AdaBits (paper, ImageNet)", "Stage II (ours)", "Stage II (paper, ImageNet)",
                      "Stage III (ours)", "Stage III (paper, ImageNet)"]
    assert len(rows) == 8 and all(len(r) == len(header) for r in rows), rows
    first = rows[0]
    assert first[:2] == ["resnet_tiny (paper: ResNet-18)", "4"]
    assert first[2:] == ["87.0", "69.1", "69.2", "82.0", "69.4", "82.0", "69.2"]
    assert {r[0] for r in rows} == {"resnet_tiny (paper: ResNet-18)", "ebn_tiny (paper: EBN 4:4:4:4)"}
    assert all(cell and cell.lower() not in ("null", "none", "nan") for r in rows for cell in r), rows


def test_per_bit_chart_has_a_point_per_epoch(browser):
    """The stage run's val/top1_2bit chart has a point for each of its evaluated epochs (a line, not a dot)."""
    from tests.ui.finished_run import EPOCHS

    page = browser.open(f"runs/{browser.ids['stage3']}/model-metrics")
    page.get_by_placeholder("Search metric charts").fill("top1_2bit")
    card = page.locator("[data-testid=experiment-view-compare-runs-card]", has_text="top1_2bit").first
    card.locator("path.point").nth(EPOCHS - 1).wait_for(state="attached")
    points = card.locator("path.point").count()
    line = card.locator("path.js-line").first.get_attribute("d")
    browser.screenshot(page, "stage3_per_bit_chart.png")
    assert points == EPOCHS, points
    assert line.count("L") == EPOCHS - 1, line  # M x0,y0 L x1,y1 L x2,y2


def test_analysis_figures_load(browser):
    """Each of the final model's analysis PNGs opens in the artifact viewer as a decoded image."""
    for name in FIGURES:
        page = browser.open(f"runs/{browser.ids['stage3']}/artifacts/analysis/{name}")
        image = page.locator("img[src^='blob:']").first
        image.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        width = image.evaluate("img => img.naturalWidth")
        if name.startswith("fig4_top1_vs_average"):
            browser.screenshot(page, "analysis_fig4.png")
        page.close()
        assert width >= 400, (name, width)


def test_pipeline_run_is_the_place_to_compare(browser):
    """The pipeline run opens in the model-training view with Table 7 as its description and the headline
    figures named architecture / stage / bit-width among its metrics."""
    page = browser.open(f"runs/{browser.ids['pipeline']}")
    page.get_by_text("resnet_tiny/stage3/top1_2bit").first.wait_for()
    more = page.get_by_text("Show more")
    if more.count():
        more.first.click()
    text = page.inner_text("body")
    browser.close_assistant(page)
    browser.screenshot(page, "pipeline_run_overview.png")
    page.set_viewport_size({"width": 1600, "height": 2000})  # tall enough for every headline figure below the tables
    page.get_by_text("resnet_tiny/stage3/top1_2bit").first.scroll_into_view_if_needed()
    browser.screenshot(page, "pipeline_run_headline_metrics.png")
    assert "Table 7: top-1 (%) per bit-width" in text
    for name in ("resnet_tiny/stage2/top1_4bit", "resnet_tiny/stage3/rand", "resnet_tiny/indep/top1_4bit"):
        assert name in text, name
    assert "Model registry" in text and "Evaluation runs" not in text  # not the GenAI view

    runs = browser.open("runs")
    runs.get_by_text(re.compile(r"^[1-9][0-9]* matching runs?")).first.wait_for()  # the list, not its spinner
    browser.screenshot(runs, "experiment_runs.png")
    assert "Bit-Mixer pipeline" in runs.inner_text("body")  # the experiment's description


def test_stage_runs_compare_side_by_side(browser):
    """MLflow's comparison page of Stage II, Stage III and the 4-bit Independent network: their names, stage
    tags and per-bit top-1 side by side, the Independent run with its own bit-width only."""
    from tests.ui.finished_run import CURVES, EPOCHS

    chosen = [browser.ids[name] for name in ("stage2", "stage3", "indep4")]
    runs = ",".join(f'"{run_id}"' for run_id in chosen)
    page = browser.open_address(f'compare-runs?runs=[{runs}]&experiments=["{browser.ids["experiment"]}"]')
    page.get_by_text("val/top1_4bit").first.wait_for()
    browser.close_assistant(page)
    text = page.inner_text("body")
    for section in ("Visualizations", "Artifacts"):  # folded: the picture shows params, metrics and tags
        page.get_by_text(section, exact=True).first.click()
    # The metrics sit in a box of fixed height (about 7 rows) whose two columns scroll apart in a screenshot:
    # "Show diff only" (params, metrics, tags) leaves out what all three share (sys/, train/ here), so that
    # the box starts at Rand. and the per-bit top-1 without scrolling, and the tags show each run's stage.
    switches = page.get_by_role("switch")
    for i in range(switches.count()):
        switches.nth(i).click()
    page.get_by_text("sys/epoch_time_s").wait_for(state="detached")
    page.set_viewport_size({"width": 1600, "height": 1900})
    page.get_by_text("Comparing 3 Runs").scroll_into_view_if_needed()
    browser.screenshot(page, "compare_stage_runs.png")
    for name in ("stage2 resnet_tiny", "stage3 resnet_tiny", "indep resnet_tiny 4bit", "independent"):
        assert name in text, name
    for name in ("val/top1_2bit", "val/top1_4bit", "val/rand_top1_mean"):
        assert name in text, name
    assert f"{CURVES[2][EPOCHS - 1]:g}" in text  # Stage II / III's last 2-bit top-1
