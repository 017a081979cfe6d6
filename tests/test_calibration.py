"""Expected calibration error and the reliability diagram of the router's confidence."""
import pytest

from moa.eval.calibration import expected_calibration_error, plot_reliability, reliability_bins


def test_calibrated_confidences_have_no_error():
    # in the 0.9 bin 9 of 10 are right, in the 0.5 bin 1 of 2
    confidence = [0.9] * 10 + [0.5] * 2
    correct = [True] * 9 + [False] + [True, False]
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0)


def test_overconfidence_is_the_weighted_gap():
    confidence = [0.95] * 4 + [0.35] * 4 + [1.0] * 2
    correct = [True, True, False, False] + [False] * 4 + [True, True]
    rows = reliability_bins(confidence, correct)
    assert [(r["low"], r["count"]) for r in rows] == [(pytest.approx(0.3), 4), (pytest.approx(0.9), 6)]
    # bin 0.3: |0 - 0.35| * 4/10; bin 0.9 (1.0 falls in the last bin): |4/6 - (0.95*4 + 2)/6| * 6/10
    want = 0.35 * 0.4 + abs(4 / 6 - 5.8 / 6) * 0.6
    assert expected_calibration_error(confidence, correct) == pytest.approx(want)
    assert expected_calibration_error([], []) == 0.0
    with pytest.raises(ValueError, match="3 confidences but 2 outcomes"):
        reliability_bins([0.1, 0.2, 0.3], [True, False])


def test_reliability_diagram_is_a_png(tmp_path):
    path = plot_reliability([0.2, 0.6, 0.95, 0.99], [False, True, True, True], tmp_path / "reliability.png", "router")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
