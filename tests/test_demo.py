"""The Figure 2 demo and the command line."""

import pytest

from hidlr.cli import main
from hidlr.demo import PAPER_GRID, run_figure2, save_figure2


def test_paper_grid():
    assert len(PAPER_GRID) == 12
    assert PAPER_GRID[0] == pytest.approx(1e-5) and PAPER_GRID[-1] == pytest.approx(10**0.5 * 1e-0)


def test_figure2_hi_dlr_beats_grid_searched_constant_rate(tmp_path):
    results = run_figure2(iterations=40)
    for name, (constant, hi_ulr, hi_dlr) in results.items():
        assert constant.method == "constant" and constant.lr in PAPER_GRID
        assert hi_dlr.final < 1e-12, name
        assert constant.final > 1e-3, name
        assert len(hi_dlr.lrs) == 40 and len(hi_dlr.lrs[0]) == 2 and len(hi_ulr.lrs[0]) == 1
    png = save_figure2(results, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_demo_prints_table(capsys, tmp_path):
    assert main(["demo", "--iterations", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("Hi-DLR") == 2 and "figure:" in out
    assert (tmp_path / "figure2.png").exists()


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["bench", "greedy", "friedman_mlp", "--lr", "0.1", "--every", "0"],
            "--every: must be int > 0",
        ),
        (["bench", "greedy", "friedman_mlp", "--lr", "-1"], "--lr: must be float > 0"),
        (["bench", "greedy", "friedman_mlp", "--lr", "nan"], "--lr: must be float > 0"),
        (["bench", "overhead", "--threads", "0"], "--threads: must be int > 0"),
        (["bench", "robustness", "--seeds", "9" * 400], "--seeds: must be int > 0 and < 2**31"),
    ],
)
def test_cli_numbers_are_checked(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
