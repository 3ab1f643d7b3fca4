"""The results chart: every bar labelled with its accuracy and PGR, reference lines for the weak model and the
gold ceiling, and no label overlapping another label or the title (checked on the rendered figure)."""

from __future__ import annotations

import itertools

import pytest

from w2s_jax.pipeline.report import results_figure

CASES = {
    "spread": [("weak", .13), ("full weak FT", .11), ("Stage I", .46), ("Stage II (sigmoid)", .47),
               ("gold SFT (ceiling)", .96)],
    "all close": [("weak", .045), ("strong (zero-shot)", .05), ("strong (ICL)", .025), ("full weak FT", .05),
                  ("Stage I", .05), ("Stage II (sigmoid)", .04), ("gold SFT (ceiling)", .055)],
    "weak near ceiling": [("weak", .50), ("full weak FT", .49), ("Stage I", .505), ("Stage II (sigmoid)", .5),
                          ("gold SFT (ceiling)", .51)],
    "perfect": [("weak", .0), ("strong (ICL)", 1.0), ("full weak FT", .995), ("Stage I", 1.0),
                ("Stage II (sigmoid)", 1.0), ("gold SFT (ceiling)", 1.0)],
}


def _res(rows):
    w, g = rows[0][1], rows[-1][1]
    return {"name": "default", "task": "gsm8k", "model_info": {"strong": {"name": "SmolLM2-135M-Instruct.Q4_1"}},
            "models": [{"model": m, "accuracy": a, "n": 200,
                        "pgr": None if m == "weak" or g == w else (a - w) / (g - w)} for m, a in rows]}


@pytest.mark.parametrize("case", CASES)
def test_chart_labels_do_not_overlap(case):
    import matplotlib.pyplot as plt

    fig = results_figure(_res(CASES[case]))
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        texts = [t for t in ax.texts if t.get_text()] + [ax.title]
        labels = [t.get_text() for t in texts]
        rows = CASES[case]
        for m, a in rows:  # every bar carries its accuracy, and PGR unless it is a reference
            assert any(lbl.startswith(f"{100 * a:.1f}%") for lbl in labels), (m, labels)
        n_pgr = sum("PGR" in lbl for lbl in labels)
        assert n_pgr == (len(rows) - 2 if rows[-1][1] != rows[0][1] else 0)
        assert any(lbl.startswith("weak ") for lbl in labels) and any(lbl.startswith("gold ceiling") for lbl in labels)
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
        for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"{ta!r} overlaps {tb!r} ({case})"
        fig_box = fig.bbox
        for t, b in boxes:  # nothing is cut off at the figure's edges
            assert b.x0 >= 0 and b.y0 >= 0 and b.x1 <= fig_box.x1 and b.y1 <= fig_box.y1, t
    finally:
        plt.close(fig)
