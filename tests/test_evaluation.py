"""Evaluation: metrics against hand-computed values and scikit-learn, bootstrap coverage, groups, McNemar,
selection's significance wording, the HTML report in headless Chromium, and `genderrec calibrate` / `evaluate`
end to end."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn import metrics as sk
from threadpoolctl import threadpool_limits

from genderrec import cli, evaluation, manifest, metrics, models, reports, selection
from genderrec.bundle import read_card
from genderrec.config import HeadConfig, SelectionConfig
from tests.helpers.bundles import save_bundle
from tests.helpers.chromium import chromium

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts" / "evaluation"

# 8 images: men are rows 0, 1, 2, 7. At 0.5: tp = {0, 1, 7}, fn = {2}, fp = {4}, tn = {3, 5, 6}.
TRUTH = np.array([1, 1, 1, 0, 0, 0, 0, 1])
P_MALE = np.array([0.9, 0.6, 0.4, 0.2, 0.55, 0.1, 0.3, 0.8])


def test_decision_metrics_by_hand():
    at_half = {key: value[0] for key, value in metrics.decision_metrics(TRUTH, P_MALE, 0.5).items()}
    assert (at_half["tn"], at_half["fp"], at_half["fn"], at_half["tp"]) == (3, 1, 1, 3)
    assert at_half["accuracy"] == pytest.approx(6 / 8)
    assert at_half["male_as_female_rate"] == pytest.approx(1 / 4)
    assert at_half["female_as_male_rate"] == pytest.approx(1 / 4)
    assert at_half["balanced_accuracy"] == pytest.approx(3 / 4)
    lower = {key: value[0] for key, value in metrics.decision_metrics(TRUTH, P_MALE, 0.35).items()}
    assert (lower["tn"], lower["fp"], lower["fn"], lower["tp"]) == (3, 1, 0, 4)
    assert lower["accuracy"] == pytest.approx(7 / 8) and lower["male_as_female_rate"] == 0
    # One class absent: its error rate is undefined, not 0.
    women_only = metrics.decision_metrics([0, 0], [0.2, 0.7], 0.5)
    assert math.isnan(women_only["male_as_female_rate"][0]) and women_only["female_as_male_rate"][0] == 0.5


def test_score_metrics_by_hand():
    scores = {key: value[0] for key, value in metrics.score_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]).items()}
    assert scores["roc_auc"] == pytest.approx(0.75)  # 3 of the 4 (man, woman) pairs ordered right
    assert scores["pr_auc"] == pytest.approx((1 / 2) * 1 + (1 / 2) * (2 / 3))  # recall steps x precision there
    assert scores["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))
    assert scores["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert scores["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)  # each image alone in its bin
    # Two images in one bin: |mean p - share male| of the bin, weighted by its size.
    ece = metrics.score_metrics([1, 0], [0.55, 0.58])["ece"][0]  # both in bin [8/15, 9/15)
    assert ece == pytest.approx(abs(0.565 - 0.5))
    tied = metrics.score_metrics([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])["roc_auc"][0]
    assert tied == pytest.approx((1 + 0.5 + 1 + 1) / 4)  # a tie counts half


def test_metrics_match_scikit_learn_with_and_without_weights():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 500)
    p_male = np.clip(rng.normal(0.35 + 0.3 * truth, 0.25), 0.001, 0.999)
    p_male[:100] = np.round(p_male[:100], 1)  # ties
    weights = rng.integers(0, 4, size=(3, 500)).astype(float)
    for row in (None, *weights):
        batch = None if row is None else row[None]
        decisions = metrics.decision_metrics(truth, p_male, 0.5, batch)
        scores = metrics.score_metrics(truth, p_male, batch)
        predicted = (p_male >= 0.5).astype(int)
        assert decisions["accuracy"][0] == pytest.approx(sk.accuracy_score(truth, predicted, sample_weight=row))
        assert decisions["balanced_accuracy"][0] == pytest.approx(
            sk.balanced_accuracy_score(truth, predicted, sample_weight=row)
        )
        assert decisions["male_as_female_rate"][0] == pytest.approx(
            1 - sk.recall_score(truth, predicted, sample_weight=row)
        )
        (tn, fp), (fn, tp) = sk.confusion_matrix(truth, predicted, sample_weight=row)
        assert [decisions[key][0] for key in ("tn", "fp", "fn", "tp")] == pytest.approx([tn, fp, fn, tp])
        assert scores["roc_auc"][0] == pytest.approx(sk.roc_auc_score(truth, p_male, sample_weight=row))
        assert scores["pr_auc"][0] == pytest.approx(sk.average_precision_score(truth, p_male, sample_weight=row))
        assert scores["log_loss"][0] == pytest.approx(sk.log_loss(truth, p_male, sample_weight=row))
        assert scores["brier"][0] == pytest.approx(sk.brier_score_loss(truth, p_male, sample_weight=row))
    assert metrics.binary_metrics(truth, p_male)["auc"] == pytest.approx(sk.roc_auc_score(truth, p_male))


def test_bootstrap_weights_resample_whole_units_reproducibly():
    units = np.repeat(np.arange(50), 3)  # 50 identities of 3 images
    bootstrap = metrics.Bootstrap(replicates=300, seed=5)
    weights = np.concatenate(list(bootstrap.weights(units)))
    assert weights.shape == (300, 150)
    assert (weights.sum(axis=1) == 150).all()  # 50 identities drawn, 3 images each
    assert (weights[:, 0::3] == weights[:, 1::3]).all() and (weights[:, 0::3] == weights[:, 2::3]).all()
    assert (np.concatenate(list(bootstrap.weights(units))) == weights).all()
    other = np.concatenate(list(metrics.Bootstrap(replicates=300, seed=6).weights(units)))
    assert not (other == weights).all()
    # The image-level mean of a draw count is 1: each unit is drawn once per replicate on average.
    assert weights.mean() == pytest.approx(1, abs=0.02)


def _synthetic(rng, n_identities, images_each, identity_effect):
    """Men and women with a score ``male + identity effect + noise``; p_male = sigmoid(2 (score - 0.5))."""
    identity = np.repeat(np.arange(n_identities), images_each)
    male = np.repeat(rng.random(n_identities) < 0.4, images_each).astype(int)
    effect = np.repeat(rng.normal(0, identity_effect, n_identities), images_each)
    noise_scale = math.sqrt(1 - identity_effect**2)
    score = male + effect + rng.normal(0, noise_scale, len(identity))
    return pd.DataFrame({"identity": identity, "male": male, "p_male": 1 / (1 + np.exp(-2 * (score - 0.5)))})


def _intervals(rows, bootstrap, units):
    """95 % intervals of accuracy at 0.5 and of ROC-AUC."""
    truth, p_male = rows["male"].to_numpy(), rows["p_male"].to_numpy()
    accuracy = bootstrap.estimate(lambda w: metrics.decision_metrics(truth, p_male, 0.5, w), units, keys=("accuracy",))[
        "accuracy"
    ]
    auc = bootstrap.estimate(lambda w: metrics.score_metrics(truth, p_male, w), units, keys=("roc_auc",))
    return accuracy, auc["roc_auc"]


def test_bootstrap_intervals_cover_the_truth_at_the_nominal_rate():
    """200 test sets from a known population: the 95 % intervals must hold the population value ~95 % of times.

    Scores are ``male + N(0, 1)`` (split into a per-identity and a per-image part), so at 0.5 the accuracy is
    Phi(0.5) and the ROC-AUC is Phi(1 / sqrt 2), exactly.
    """
    true_accuracy, true_auc = norm.cdf(0.5), norm.cdf(1 / math.sqrt(2))
    rng = np.random.default_rng(11)
    covered = {"accuracy": 0, "roc_auc": 0, "accuracy_by_image": 0}
    repetitions = 200
    bootstrap = metrics.Bootstrap(replicates=400, seed=1)
    with threadpool_limits(limits=1):  # hundreds of tiny matrix products: BLAS threads only add overhead
        for _ in range(repetitions):
            rows = _synthetic(rng, n_identities=100, images_each=3, identity_effect=0.8)
            units, unit = evaluation.bootstrap_units(rows)
            assert unit == "identity"
            accuracy, auc = _intervals(rows, bootstrap, units)
            by_image, _ = _intervals(rows, bootstrap, np.arange(len(rows)))
            covered["accuracy"] += accuracy["low"] <= true_accuracy <= accuracy["high"]
            covered["roc_auc"] += auc["low"] <= true_auc <= auc["high"]
            covered["accuracy_by_image"] += by_image["low"] <= true_accuracy <= by_image["high"]
    rates = {key: value / repetitions for key, value in covered.items()}
    print(f"coverage of the 95 % intervals over {repetitions} test sets: {rates}")
    assert 0.90 <= rates["accuracy"] <= 0.99
    assert 0.90 <= rates["roc_auc"] <= 0.99
    # Images of one person are correlated: resampling images instead of identities gives too narrow intervals.
    assert rates["accuracy_by_image"] < rates["accuracy"] - 0.05


def test_choose_threshold_and_fit_temperature():
    # Women 0.1 0.2 0.3 0.6, men 0.35 0.7 0.8 0.9: 0.325 and 0.65 both give balanced accuracy 7/8; 0.65 is nearer 0.5.
    truth = [0, 0, 0, 0, 1, 1, 1, 1]
    p_male = [0.1, 0.2, 0.3, 0.6, 0.35, 0.7, 0.8, 0.9]
    assert metrics.choose_threshold(truth, p_male, "balanced_accuracy") == pytest.approx(0.65)
    assert metrics.choose_threshold(truth, p_male, "accuracy") == pytest.approx(0.65)
    # Imbalance: accuracy prefers calling everyone female, balanced accuracy does not.
    # Women 0.1 … 0.8, men 0.55 and 0.9: above 0.8 is 9/10 right (balanced 0.75); above 0.5 7/10 (balanced 0.81).
    truth, p_male = [0] * 8 + [1, 1], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.55, 0.9]
    assert metrics.choose_threshold(truth, p_male, "accuracy") == pytest.approx(0.85)
    assert metrics.choose_threshold(truth, p_male, "balanced_accuracy") == pytest.approx(0.525)

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 20_000)
    truth = (rng.random(20_000) < 1 / (1 + np.exp(-logits))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * logits))
    temperature = metrics.fit_temperature(truth, overconfident)
    assert temperature == pytest.approx(3, rel=0.05)
    calibrated = metrics.apply_temperature(overconfident, temperature)
    assert sk.log_loss(truth, calibrated) < sk.log_loss(truth, overconfident) - 0.05
    assert ((calibrated >= 0.5) == (overconfident >= 0.5)).all()  # decisions at 0.5 never change


def _crafted_groups():
    """100 images: 40 with eyeglasses (10 wrong), 60 without (6 wrong: rows 40-45, 5 of them the only bald
    people); region south (rows 0-45, 16 wrong), north (46-79) and east (80-99) all right."""
    male = np.tile([1, 0], 50)
    right = np.ones(100, dtype=bool)
    right[:20] = np.arange(20) % 2 == 0  # eyeglasses (rows 0-39): rows 1, 3, …, 19 are wrong
    right[40:46] = False
    p_male = np.where(right == male.astype(bool), 0.8, 0.2)
    return pd.DataFrame(
        {
            "image_uri": [f"/faces/{index}.jpg" for index in range(100)],
            "male": male,
            "split": "test",
            "identity": np.arange(100),
            "official_split": "train",
            "Eyeglasses": (np.arange(100) < 40).astype(np.int8),
            "Bald": ((np.arange(100) >= 41) & (np.arange(100) <= 45)).astype(np.int8),
            "Wearing_Hat": np.zeros(100, dtype=np.int8),
            "region": np.select([np.arange(100) < 46, np.arange(100) < 80], ["south", "north"], "east"),
            "p_male": p_male,
        }
    )


def test_group_report_on_a_crafted_manifest():
    rows = _crafted_groups()
    assert evaluation.group_columns(rows, ["region"]) == ["Eyeglasses", "Bald", "Wearing_Hat", "region"]
    with pytest.raises(ValueError, match="--group-by.*'country'.*no such column"):
        evaluation.group_columns(rows, ["country"])
    bootstrap = metrics.Bootstrap(replicates=500, seed=0)
    report = evaluation.group_report(
        rows, 0.5, evaluation.group_columns(rows, ["region"]), bootstrap, np.arange(100), min_size=10
    )
    columns = {column["column"]: column for column in report["columns"]}
    assert report["skipped_columns"] == ["Wearing_Hat"] and set(columns) == {"Eyeglasses", "Bald", "region"}
    glasses = {group["value"]: group for group in columns["Eyeglasses"]["groups"]}
    assert (glasses["1"]["n"], glasses["1"]["n_male"], glasses["1"]["n_female"]) == (40, 20, 20)
    assert glasses["1"]["accuracy"]["value"] == pytest.approx(30 / 40)
    assert glasses["0"]["accuracy"]["value"] == pytest.approx(54 / 60)
    # Rows 1, 3, …, 19 are wrong women (male = 0 at odd rows): 10 of the 20 women with glasses labeled male.
    assert glasses["1"]["female_as_male_rate"]["value"] == pytest.approx(10 / 20)
    assert glasses["1"]["male_as_female_rate"]["value"] == 0
    assert glasses["1"]["female_as_male_rate"]["n"] == 20 and not glasses["1"]["female_as_male_rate"]["small"]
    assert glasses["0"]["accuracy"]["n"] == 60 and not glasses["0"]["accuracy"]["small"]
    for group in glasses.values():
        assert group["accuracy"]["low"] <= group["accuracy"]["value"] <= group["accuracy"]["high"]
    gap = columns["Eyeglasses"]["gap"]
    assert gap["value"] == pytest.approx(54 / 60 - 30 / 40) and (gap["best"], gap["worst"]) == ("0", "1")
    assert gap["low"] <= gap["value"] <= gap["high"]
    bald = {group["value"]: group for group in columns["Bald"]["groups"]}
    assert bald["1"]["n"] == 5 and bald["1"]["small"] and bald["1"]["accuracy"]["value"] == 0
    # Rows 41-45: men at 42 and 44. Each rate says how many images it rests on.
    assert (bald["1"]["male_as_female_rate"]["n"], bald["1"]["female_as_male_rate"]["n"]) == (2, 3)
    assert bald["1"]["male_as_female_rate"]["small"] and bald["1"]["accuracy"]["small"]
    assert columns["Bald"]["gap"] is None  # one sizeable group only
    regions = {group["value"]: group for group in columns["region"]["groups"]}
    assert {name: group["n"] for name, group in regions.items()} == {"south": 46, "north": 34, "east": 20}
    assert regions["south"]["accuracy"]["value"] == pytest.approx(30 / 46)
    assert report["largest_gap"]["column"] == "region" and report["largest_gap"]["worst"] == "south"
    assert report["largest_gap"]["value"] == pytest.approx(1 - 30 / 46) and report["largest_gap"]["significant"]
    # The worst group is region=south (0.65), not the small Bald=1 group (0 of 5 right): too small to rank.
    assert (report["worst_group"]["column"], report["worst_group"]["value"]) == ("region", "south")


def test_mcnemar_and_holm_on_a_crafted_case():
    # 50 both right, 10 only A right, 2 only B right, 5 both wrong.
    a = np.r_[np.ones(50), np.ones(10), np.zeros(2), np.zeros(5)].astype(bool)
    b = np.r_[np.ones(50), np.zeros(10), np.ones(2), np.zeros(5)].astype(bool)
    result = metrics.mcnemar(a, b)
    assert (result["only_a_correct"], result["only_b_correct"]) == (10, 2)
    assert result["p_exact"] == pytest.approx(2 * (66 + 12 + 1) / 4096)  # 2 P(X >= 10), X ~ Bin(12, 1/2)
    assert result["p_continuity"] == pytest.approx(0.04331, abs=1e-4)  # chi2 = (|10 - 2| - 1)^2 / 12
    assert metrics.mcnemar(b, a)["p_exact"] == pytest.approx(result["p_exact"])
    assert metrics.mcnemar(a, a)["p_exact"] == 1.0
    assert metrics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])

    # The comparison of `evaluate --runs` and train_all: each model against the best, McNemar exact, Holm.
    rows = pd.DataFrame({"male": np.r_[np.ones(34), np.zeros(33)].astype(int)})
    worst = np.r_[np.ones(40), np.zeros(27)].astype(bool)  # 40 right, all of them right in a too
    predictions = pd.DataFrame(
        {
            name: np.where(right == rows["male"].astype(bool), 0.9, 0.1)
            for name, right in zip("abc", (a, b, worst), strict=True)
        }
    )
    runs = {name: {"architecture": name, "mode": "fine_tune"} for name in "abc"}
    compared = evaluation.compare_models(rows, predictions, runs, evaluation.EvaluationOptions(replicates=200))
    assert compared["best"] == "a" and [entry["name"] for entry in compared["models"]] == ["a", "b", "c"]
    versus = {entry["name"]: entry["vs_best"] for entry in compared["models"][1:]}
    assert versus["b"]["mcnemar"]["p_exact"] == pytest.approx(result["p_exact"])
    assert versus["b"]["accuracy_difference"]["value"] == pytest.approx((52 - 60) / 67)
    # Holm: the smaller p-value is doubled (two comparisons), the larger one kept (it is not below the doubled one).
    assert versus["c"]["p_holm"] == pytest.approx(2 * versus["c"]["mcnemar"]["p_exact"])
    assert versus["b"]["p_holm"] == pytest.approx(result["p_exact"]) and versus["b"]["significant"]


def _runs(val_accuracy):
    """Three runs on 200 test images and their comparison: vgg16 right on 180, resnet50 on 176 (10 right only
    there, 14 only in vgg16: not significant), googlenet on 140 (all of them right in vgg16 too: significant)."""
    truth = np.tile([1, 0], 100)
    wrong = {"vgg16": range(0, 20), "resnet50": range(10, 34), "googlenet": range(0, 60)}
    predictions = {}
    for architecture, indices in wrong.items():
        right = np.ones(200, dtype=bool)
        right[list(indices)] = False
        predictions[f"{architecture}_{'transfer' if architecture == 'googlenet' else 'fine_tune'}"] = np.where(
            right == truth.astype(bool), 0.8, 0.2
        )
    board = pd.DataFrame(
        {
            "architecture": ["vgg16", "resnet50", "googlenet"],
            "mode": ["fine_tune", "fine_tune", "transfer"],
            "val_accuracy": val_accuracy,
            "test_accuracy": [0.90, 0.88, 0.70],
            "inference_ms_per_1000": [30.0, 20.0, 10.0],
        }
    )
    runs = {name: {"architecture": name.split("_")[0], "mode": name.split("_", 1)[1]} for name in predictions}
    options = evaluation.EvaluationOptions(replicates=200)
    return board, evaluation.compare_models(pd.DataFrame({"male": truth}), pd.DataFrame(predictions), runs, options)


def test_selection_chooses_on_validation_and_says_whether_the_lead_is_significant():
    board, compared = _runs([0.90, 0.88, 0.70])
    rule = SelectionConfig(tolerance=0.0)
    assert rule.metric == "val_accuracy"  # the default: choosing on test would overstate the winner
    chosen, reason = selection.select(board, rule, compared)
    assert selection.run_name(chosen) == "vgg16/fine_tune"
    assert reason.startswith("chosen on the validation split: best val_accuracy (0.9000)")
    assert "test accuracy +0.0200 vs the best other run resnet50_fine_tune: NOT significant (McNemar exact" in reason
    assert "Holm-adjusted over 2 comparisons" in reason and "tied within the noise" in reason
    _, reason = selection.select(board, rule)
    assert "not tested for significance" in reason
    # Tolerance picks the faster resnet50; the reason gives its (negative) difference to the best run on test.
    close, _ = _runs([0.90, 0.898, 0.70])
    chosen, reason = selection.select(close, SelectionConfig(tolerance=0.005), compared)
    assert selection.run_name(chosen) == "resnet50/fine_tune" and "-0.0200 vs the best other run vgg16" in reason
    _, reason = selection.select(board, SelectionConfig(pin="googlenet/transfer"), compared)
    assert reason.startswith("pinned in the config (googlenet/transfer); test accuracy -0.2000")
    assert ": significant (McNemar exact test on 200 paired test images" in reason
    # Choosing on test stays possible, and says so.
    _, reason = selection.select(board, SelectionConfig(metric="test_accuracy"), compared)
    assert reason.startswith("chosen on the TEST split (its test metrics are optimistic")
    with pytest.raises(ValueError, match="val_accuracy: no run has a value"):
        selection.select(board.assign(val_accuracy=np.nan), rule, compared)


def assert_self_contained(page: str) -> None:
    """No script, no stylesheet or font from elsewhere, every image inline, every link local."""
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//)', page, flags=re.IGNORECASE)


def test_report_html_is_self_contained_and_renders_in_chromium(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    rows = _synthetic(rng, n_identities=150, images_each=2, identity_effect=0.5)
    rows["image_uri"] = [f"/faces/{index:06d}.jpg" for index in range(len(rows))]
    rows["image_id"] = [f"{index:06d}.jpg" for index in range(len(rows))]
    rows["Eyeglasses"] = (rng.random(len(rows)) < 0.2).astype(np.int8)
    val = _synthetic(rng, n_identities=100, images_each=1, identity_effect=0.5)
    result = evaluation.evaluate_predictions(rows, val, evaluation.EvaluationOptions(replicates=200))
    result["model"] = {"dir": "/models/x", "name": "x_fine_tune", "architecture": "x", "mode": "fine_tune"}
    result["data"]["manifest"] = "/manifests/m.parquet"
    out = tmp_path / "report"
    written = reports.write_model_report(result, rows, str(out), face_images=False)
    assert {Path(uri).name for uri in written} == {
        "roc.png",
        "reliability.png",
        "confusion.png",
        "groups.png",
        "metrics.json",
        "report.html",
    }
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert page.count("<img") == 4 and result["mistakes"][0]["image_id"] in page  # the mistakes as a table

    with chromium(tmp_path / "chromium-profile") as driver:
        driver.get((out / "report.html").as_uri())
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
        assert loaded == []  # the page fetched nothing
        widths = driver.execute_script("return Array.from(document.images).map(image => image.naturalWidth)")
        assert len(widths) == 4 and min(widths) > 100  # every embedded figure decoded
        assert "Headline metrics" in driver.find_element("tag name", "body").text
        screenshot = driver.get_screenshot_as_png()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(screenshot)
    pixels = np.asarray(Image.open(io.BytesIO(screenshot)).convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 100).mean() > 0.01  # text and figures, not a blank page


@pytest.fixture()
def eval_manifest(tmp_path, celeba_manifest):
    """100 validation and 100 test faces the tiny model never trained on, plus one test row with a missing file."""
    val = celeba_manifest[celeba_manifest["split"] == "val"].head(100)
    test = celeba_manifest[celeba_manifest["split"] == "test"].head(100)
    missing = test.iloc[:1].assign(image_uri=str(tmp_path / "gone.jpg"), image_id="gone.jpg")
    uri = tmp_path / "manifest.parquet"
    manifest.write_manifest(pd.concat([val, test, missing]), str(uri))
    return uri


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_calibrate_then_evaluate_cli_end_to_end_on_real_faces(tiny_model_dir, eval_manifest, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)  # calibrate writes the card: never the shared fixture's
    untouched = _files(model_dir)
    out = tmp_path / "report"
    argv = ["evaluate", "--model", str(model_dir), "--manifest", str(eval_manifest), "--out", str(out)]
    assert cli.main([*argv, "--group-by", "official_split", "--bootstrap", "500"]) == 0
    assert "report:" in capsys.readouterr().out
    assert _files(model_dir) == untouched  # evaluate reads a model directory, never writes it
    assert cli.main([*argv, "--calibrate"]) == 2
    assert "genderrec calibrate --model DIR --manifest M" in capsys.readouterr().err
    assert _files(model_dir) == untouched

    result = json.loads((out / "metrics.json").read_text())
    assert result["schema"] == "genderrec.evaluation/1"
    assert result["data"]["images"] == 100 and result["data"]["excluded_unreadable"] == 1
    assert "gone.jpg" in result["data"]["unreadable_examples"][0]
    assert result["bootstrap"]["unit"] == "identity" and result["bootstrap"]["replicates"] == 500
    assert 0 < result["threshold"]["validation"] < 1 and result["threshold"]["fixed"] == 0.5
    for point in result["at_threshold"].values():
        for key in ("accuracy", "balanced_accuracy", "male_as_female_rate", "female_as_male_rate"):
            assert point[key]["low"] <= point[key]["value"] <= point[key]["high"]
        assert sum(map(sum, point["confusion_matrix"]["counts"])) == 100
    assert set(result["metrics"]) == {"roc_auc", "pr_auc", "log_loss", "brier", "ece"}
    group_names = {column["column"] for column in result["groups"]["columns"]} | set(
        result["groups"]["skipped_columns"]
    )
    assert {"Eyeglasses", "Young", "Pale_Skin", "Wearing_Hat", "official_split"} <= group_names
    assert len(group_names) == 40  # CelebA's 39 other attributes and the named column
    assert len(result["mistakes"]) == evaluation.MISTAKES_LISTED
    assert result["calibration"]["temperature"] is None and "before" not in result["calibration"]
    for name in ("roc.png", "reliability.png", "confusion.png", "groups.png", "mistakes.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert page.count("<img") == 5 and "genderrec calibrate" in page

    # genderrec calibrate: the one command that writes a temperature; fitted on raw outputs, so it is repeatable.
    calibrate = ["calibrate", "--model", str(model_dir), "--manifest", str(eval_manifest)]
    assert cli.main(calibrate) == 0
    assert "temperature" in capsys.readouterr().out
    card = read_card(str(model_dir))
    assert card.temperature > 0 and card.calibration.fitted_on.endswith("split=val (100 images)")
    assert card.calibration.val_log_loss_after <= card.calibration.val_log_loss_before
    assert _files(model_dir)["model.keras"] == untouched["model.keras"]
    assert cli.main(calibrate) == 0
    assert read_card(str(model_dir)).temperature == pytest.approx(card.temperature)  # replaced, not compounded

    # Evaluated again: predictions carry the card's temperature; "before" is the evaluation without it.
    plain = tmp_path / "plain"
    argv = ["evaluate", "--model", str(model_dir), "--manifest", str(eval_manifest), "--out", str(plain)]
    assert cli.main([*argv, "--no-face-images", "--bootstrap", "500"]) == 0
    again = json.loads((plain / "metrics.json").read_text())
    calibration = again["calibration"]
    assert calibration["temperature"] == pytest.approx(card.temperature)
    assert calibration["fitted_on"] == card.calibration.fitted_on
    assert calibration["before"]["log_loss"] == pytest.approx(result["metrics"]["log_loss"]["value"], rel=1e-6)
    assert again["metrics"]["log_loss"]["value"] != pytest.approx(result["metrics"]["log_loss"]["value"], rel=1e-6)
    assert again["at_threshold"]["fixed"] == result["at_threshold"]["fixed"]  # decisions at 0.5 never change
    assert not (plain / "mistakes.png").exists()
    page = (plain / "report.html").read_text()
    assert page.count("<img") == 4 and again["mistakes"][0]["image_uri"] in page


def test_evaluate_cli_rejects_bad_requests(tiny_model_dir, eval_manifest, tmp_path, capsys):
    base = ["evaluate", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    assert cli.main(base) == 2
    assert "--model needs --manifest" in capsys.readouterr().err
    assert cli.main([*base, "--manifest", str(eval_manifest), "--split", "holdout"]) == 2
    assert "no row has split='holdout'" in capsys.readouterr().err
    assert cli.main([*base, "--manifest", str(eval_manifest), "--group-by", "country"]) == 2
    assert "--group-by ['country']: no such column" in capsys.readouterr().err
    assert cli.main(["evaluate", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "manifest.parquet" in capsys.readouterr().err


def test_evaluate_runs_compares_models_on_the_same_faces(tiny_model_dir, eval_manifest, tmp_path):
    """A run directory with the tiny model and an untrained one: the comparison names the best and tests it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "models" / "googlenet_fine_tune")
    shutil.copytree(tiny_model_dir, run / "selected")
    size = read_card(str(tiny_model_dir)).input_size
    head = HeadConfig(pooling="flatten", dense_units=4, dropout=0.0)
    untrained = models.build_model("googlenet", "transfer", size, "none", head)
    save_bundle(untrained, run / "models" / "googlenet_transfer", mode="transfer", input_size=size)
    shutil.copy(eval_manifest, run / "manifest.parquet")

    out = tmp_path / "compare"
    argv = ["evaluate", "--runs", str(run), "--out", str(out), "--bootstrap", "300", "--no-face-images"]
    assert cli.main(argv) == 0
    comparison = json.loads((out / "metrics.json").read_text())
    assert comparison["schema"] == "genderrec.comparison/1" and comparison["images"] == 100
    assert comparison["selected"] == "googlenet_fine_tune"
    by_name = {model["name"]: model for model in comparison["models"]}
    assert set(by_name) == {"googlenet_fine_tune", "googlenet_transfer"}
    best = by_name[comparison["best"]]
    other = next(model for model in comparison["models"] if not model["best"])
    assert best["accuracy"]["value"] >= other["accuracy"]["value"]
    versus = other["vs_best"]
    assert versus["accuracy_difference"]["value"] == pytest.approx(
        other["accuracy"]["value"] - best["accuracy"]["value"]
    )
    assert 0 <= versus["mcnemar"]["p_exact"] <= 1 and versus["p_holm"] == versus["mcnemar"]["p_exact"]
    assert versus["significant"] == (versus["p_holm"] < 0.05)
    for name in by_name:
        assert (out / "models" / name / "metrics.json").exists()
    assert_self_contained((out / "report.html").read_text())


def test_leaderboard_markdown_and_figures_show_intervals(tmp_path):
    board = pd.DataFrame(
        [
            {"architecture": arch, "mode": mode, "test_accuracy": acc, "inference_ms_per_1000": 5.0}
            for arch, mode, acc in [
                ("vgg16", "fine_tune", 0.81),
                ("vgg16", "transfer", 0.74),
                ("googlenet", "fine_tune", 0.78),
                ("googlenet", "transfer", 0.70),
            ]
        ]
    )
    board["test_accuracy_low"], board["test_accuracy_high"] = (
        board["test_accuracy"] - 0.03,
        board["test_accuracy"] + 0.02,
    )
    board["p_vs_best_holm"] = [np.nan, 0.01, 0.4, 0.001]
    markdown = reports.leaderboard_markdown(board, "Leaderboard")
    assert "test_accuracy_low" in markdown.splitlines()[2] and "0.7800" in markdown and "0.4000" in markdown
    histories = {
        f"{arch}_{mode}": [{"epoch": 1, "accuracy": 0.6, "val_accuracy": 0.55}]
        for arch, mode in board[["architecture", "mode"]].itertuples(index=False)
    }
    written = reports.write_leaderboard_figures(board, histories, str(tmp_path))
    assert [Path(uri).name for uri in written] == ["training_curves.png", "test_accuracy.png", "inference_time.png"]
    assert all(Path(uri).read_bytes()[:4] == b"\x89PNG" for uri in written)
