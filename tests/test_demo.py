"""The demo path end to end on a tiny family: it trains in seconds, learns language, and
universality is a product of training (trained seeds beat the rotation baseline, init does not)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from universal_neurons.activations import TokenSet
from universal_neurons.demo import DEMO_TRAIN_CONFIG, TINY_DEMO_CONFIG, run_demo
from universal_neurons.pipeline import PipelineConfig, run_pipeline


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # the session's cache (conftest): the notebooks reuse this family instead of training it again
    res = run_demo(out_dir=root / "out", config=TINY_DEMO_CONFIG, seeds=(0, 1, 2), eval_tokens=16_384,
                   show_progress=False)
    return root, res


def test_demo_family_saves_checkpoints_where_universal_neurons_exist():
    """The demo family's universal neurons form within the first quarter of training
    (docs/demo_family.md): at least four checkpoints from there on, so that persistence between
    checkpoints is defined, and the step-0 reference."""
    steps, n = DEMO_TRAIN_CONFIG.checkpoint_steps(), DEMO_TRAIN_CONFIG.n_steps
    assert steps[0] == 0 and steps[-1] == n
    assert len([s for s in steps if s >= n / 4]) >= 4, steps


def test_demo_trains_and_runs_every_stage(demo_run):
    root, res = demo_run
    for seed, loss in res["val_loss"].items():
        assert loss < res["unigram_entropy"] - 0.3, (seed, loss, res["unigram_entropy"])
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["demo"]["val_loss"] == res["val_loss"]
    assert summary["universality"]["neurons"] == 2 * 128
    assert len(summary["universality"]["per_layer"]) == 2


def test_universality_is_a_product_of_training(demo_run):
    root, res = demo_run
    seeds = [Path(res["family_dir"]) / f"seed-{c}" for c in "abc"]
    text = TokenSet.load(root / "out" / "tokens.h5")
    cfg = PipelineConfig(tokens=text.config)
    init = run_pipeline(seeds, text, root / "init", checkpoint=0, config=cfg).table
    final = run_pipeline(seeds, text, root / "final", config=cfg).table
    def t_stat(table):  # mean excess over the rotation baseline, in standard errors
        e = (table["mean_corr"] - table["mean_baseline"]).dropna().to_numpy()
        return e.mean() / (e.std(ddof=1) / np.sqrt(len(e)))

    t_init, t_final = t_stat(init), t_stat(final)
    print(f"excess over baseline: init t={t_init:.2f}, trained t={t_final:.2f}")
    assert abs(t_init) < 3, t_init  # at initialisation a seed matches another no better than chance
    assert t_final > 5 and t_final > t_init + 5, (t_init, t_final)


def test_demo_report_opens_with_a_card_per_universal_neuron(demo_run):
    """The demo family's own report in headless Chromium: the Neurons section has one card per
    universal neuron (or, when the tiny family has none past the paper's cut, its contrast
    neurons, said so), tokens coloured by activation, no JavaScript error; screenshot kept."""
    import shutil as _shutil

    from tests import _browser as browser

    if not browser.chromium_path():
        pytest.skip("no chromium: run scripts/install_browser.sh")
    pytest.importorskip("playwright")
    root, res = demo_run
    report = root / "out" / "report.html"
    shot, cards_shot = root / "demo-report.png", root / "demo-report-cards.png"
    got = browser.open_in_browser(report, shot, cards_screenshot=cards_shot)
    for path in (shot, cards_shot):
        if os.environ.get("UN_TEST_ARTIFACTS") and path.exists():
            Path(os.environ["UN_TEST_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
            _shutil.copy(path, Path(os.environ["UN_TEST_ARTIFACTS"]) / path.name)
    assert got["page_errors"] == [] and got["console_errors"] == [] and got["requests"] == []
    n_universal = json.loads((root / "out" / "summary.json").read_text())["universality"]["universal"]
    cards = got["cards"]
    assert cards is not None and cards["shown"] > 0
    if n_universal:
        assert cards["n_data"] == n_universal
    assert cards["contexts"] > 0 and cards["coloured"] > 0, cards
    assert shot.is_file() and cards_shot.is_file()
    assert (root / "out" / "agreement" / "agreement.csv").exists()
