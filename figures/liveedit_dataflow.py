"""Draw LiveEdit's data flow (DESIGN.md section 3) as boxes and arrows: figures/liveedit_dataflow.png.

    python figures/liveedit_dataflow.py [--out figures/liveedit_dataflow.png]

Top row: an edit request runs the frozen model to layer l_e, the edit-side extractor and the expert
generator turn its states into one expert, appended to the repository. Bottom row: a query runs to
layer l_e, the input-side extractor gives its features, the hard filter and the soft routing pick and
weigh experts from the repository, and their low-rank residual is added before the layers above.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

EDIT, QUERY, STORE, FROZEN = "#fde2c8", "#d6e9f8", "#e3f1da", "#eeeeee"


def box(ax, x, y, w, h, title, body="", colour="#ffffff"):
    """A rounded box centred at (x, y) with a bold title and a smaller body; returns its edges."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=colour, ec="#555555", lw=1.0))
    if body:
        ax.text(x, y + h * 0.2, title, ha="center", va="center", fontsize=9, weight="bold")
        ax.text(x, y - h * 0.17, body, ha="center", va="center", fontsize=7.3, linespacing=1.25)
    else:
        ax.text(x, y, title, ha="center", va="center", fontsize=9, weight="bold")
    return {"l": (x - w / 2, y), "r": (x + w / 2, y), "t": (x, y + h / 2), "b": (x, y - h / 2)}


def arrow(ax, a, b, label="", style="-|>", rad=0.0, colour="#333333", dy=0.12):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=11, lw=1.1, color=colour,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if label:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + dy, label, ha="center", va="bottom", fontsize=7,
                style="italic", color=colour)


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(15.5, 6.8))
    ax.set_xlim(0, 15.6)
    ax.set_ylim(-0.45, 6.6)
    ax.axis("off")
    y_edit, y_store, y_query = 5.35, 3.3, 1.25

    # ---- edit path (one lifelong step, no gradient) ------------------------------------------------
    ax.text(0.15, 6.45, "edit (one lifelong step, no gradient)", fontsize=10, weight="bold", color="#a0522d", va="top")
    e_in = box(ax, 1.25, y_edit, 2.1, 1.05, "edit request", "image $v_e$, prompt $p_e$,\ntarget $o_e$ (teacher-forced)", EDIT)
    e_llm = box(ax, 3.95, y_edit, 2.2, 1.05, "frozen VLLM", "decoder layers $0..l_e$\n(vision tokens + text)", FROZEN)
    e_h = box(ax, 6.6, y_edit, 2.0, 1.05, "layer-$l_e$ states", "$H_e = [H_v; H_p; H_o]$", EDIT)
    e_ext = box(ax, 9.35, y_edit + 0.62, 2.6, 0.95, "edit-side extractor",
                "$\\hat\\phi_e$: prompt-guided visual\n$\\hat\\psi_e$: textual  ($k \\times d_m$)", EDIT)
    e_gen = box(ax, 9.35, y_edit - 0.62, 2.6, 0.95, "expert generator",
                "$U_e, V_e \\in R^{r \\times d}$ from\nlearned queries over $H_e$", EDIT)
    arrow(ax, e_in["r"], e_llm["l"])
    arrow(ax, e_llm["r"], e_h["l"])
    arrow(ax, e_h["r"], e_ext["l"], rad=-0.15)
    arrow(ax, e_h["r"], e_gen["l"], rad=0.15)

    # ---- the repository ------------------------------------------------------------------------------
    repo = box(ax, 13.6, y_store + 0.35, 2.9, 1.6, "expert repository",
               "one row per edit: $(\\hat\\phi_i, \\hat\\psi_i, U_i, V_i)$\npreallocated, grows by doubling\n"
               "(append: amortised O(1))", STORE)
    arrow(ax, e_ext["r"], (repo["t"][0] - 0.5, repo["t"][1]), "append", rad=-0.2)
    arrow(ax, e_gen["r"], (repo["t"][0] + 0.3, repo["t"][1]), rad=-0.1)

    # ---- query path (inference) ---------------------------------------------------------------------
    ax.text(0.15, 2.45, "query (inference)", fontsize=10, weight="bold", color="#1f5f99", va="top")
    q_in = box(ax, 1.2, y_query, 2.0, 1.05, "query", "image $v$, prompt $p$", QUERY)
    q_llm = box(ax, 3.7, y_query, 2.2, 1.05, "frozen VLLM", "layers $0..l_e$ give $H$\n(text-only: not routed)", FROZEN)
    q_ext = box(ax, 6.25, y_query, 2.2, 1.25, "input-side extractor",
                "$\\bar\\phi$, $\\bar\\psi$ and the vision\nsentinel's $\\bar\\phi_S$", QUERY)
    q_hard = box(ax, 8.85, y_query, 2.3, 1.25, "hard filter",
                 "keep expert $i$ iff\n$sim(\\bar\\phi, \\hat\\phi_i) > sim(\\bar\\phi, \\bar\\phi_S)$", QUERY)
    q_soft = box(ax, 11.45, y_query, 2.3, 1.25, "soft routing",
                 "$t_i = sim(\\bar\\psi, \\hat\\psi_i)$\n$w_i = softmax(t)_i \\cdot \\sigma(t_i)$", QUERY)
    q_res = box(ax, 14.2, y_query, 2.6, 1.25, "residual at $l_e$",
                "$h \\leftarrow h + \\sum_i w_i V_i^T relu(U_i LN_x(h))$\nthen layers $l_e{+}1..$ → answer", QUERY)
    arrow(ax, q_in["r"], q_llm["l"])
    arrow(ax, q_llm["r"], q_ext["l"])
    arrow(ax, q_ext["r"], q_hard["l"])
    arrow(ax, q_hard["r"], q_soft["l"])
    arrow(ax, q_soft["r"], q_res["l"])
    arrow(ax, (q_llm["r"][0] - 0.4, q_llm["b"][1]), (q_res["b"][0], q_res["b"][1]), "$H$ (every position)",
          rad=0.1, colour="#777777", dy=-0.5)
    arrow(ax, (repo["b"][0] - 1.1, repo["b"][1]), q_hard["t"], "$\\hat\\phi$", rad=0.1, colour="#3c7a2d")
    arrow(ax, (repo["b"][0] - 0.3, repo["b"][1]), q_soft["t"], "$\\hat\\psi$", rad=0.05, colour="#3c7a2d")
    arrow(ax, (repo["b"][0] + 0.5, repo["b"][1]), q_res["t"], "$U, V$", rad=-0.05, colour="#3c7a2d")
    ax.text(7.8, -0.4, "No expert kept: the output equals the unedited model's exactly. Trainable: both extractors, "
            "the generator, $LN_x$ (the VLLM stays frozen).", ha="center", fontsize=8, color="#444444")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "liveedit_dataflow.png"))
    print(draw(Path(p.parse_args(argv).out)))


if __name__ == "__main__":
    main()
