"""The bench's verdicts: medians of interleaved repetitions, and no ratio above the speculative bound (or inside
its own noise) stated as a speedup. The points are shaped like `mtpquant bench`'s bench.json, numbers made up
for the case each test names (the real bench runs in tests/test_serve_chain.py)."""

from mtpquant.model.recipes import load
from mtpquant.serving.bench import markdown, schedule, summarize


def point(mtp: bool, rep: int, tok_s: float, length: float = 1.95) -> dict:
    result = {"output_throughput": tok_s, "median_ttft_ms": 10.0, "median_itl_ms": 5.0}
    if mtp:
        result |= {"spec_decode_acceptance_rate": (length - 1) * 100, "spec_decode_acceptance_length": length}
    return {"mtp": mtp, "concurrency": 1, "repeat": rep, "result": result}


def test_a_clean_run_is_a_measurement():
    pts = [point(True, r, 150 + r) for r in range(3)] + [point(False, r, 100 + r) for r in range(3)]
    (row,) = summarize(pts)
    assert row["verdict"] == "measured"
    assert abs(row["mtp_speedup"] - 151 / 101) < 1e-9
    assert row["mtp_output_throughput_min"] == 150 and row["mtp_output_throughput_max"] == 152


def test_a_loaded_run_is_flagged_not_reported():
    """No-MTP ran while something else loaded the machine: 4.7x with one draft token (bound 1.95x) is load."""
    pts = [point(True, r, 30.0) for r in range(3)] + [point(False, r, 6.4) for r in range(3)]
    (row,) = summarize(pts)
    assert row["verdict"] == "not a measurement: above the speculative bound 1.95x"
    assert "not a measurement" in markdown([row], "t")


def test_a_spread_wider_than_the_effect_is_noise():
    pts = [point(True, r, v) for r, v in enumerate((20, 30, 40))] + [
        point(False, r, v) for r, v in enumerate((31, 29, 30))]
    (row,) = summarize(pts)
    assert row["verdict"] == "within noise: the spread is wider than the effect"


def test_together_alternates_which_setting_goes_first():
    grid = load("bench", "tiny")
    order = schedule(grid)
    assert len(order) == 3 * 3 * 2
    firsts = [mtp for i, (r, c, mtp) in enumerate(order) if i % 2 == 0]
    assert firsts.count(True) == 6 and firsts.count(False) == 3  # r0, r2: MTP first; r1: no-MTP first
    seed = schedule(load("bench", "seed"))
    assert [m for _, _, m in seed] == [True] * 9 + [False] * 9  # one server at a time
