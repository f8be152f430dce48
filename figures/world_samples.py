"""Draw a few entities of the synthetic world beside their questions: figures/world_samples.png.

    python figures/world_samples.py [--seed 0] [--n 4] [--out figures/world_samples.png]

Each row shows an entity's two dataset renders (the edit image and the rephrased image) and what the
tiny backbones are pretrained to answer about it (VQA colours, caption, VLKEB city and country), then a
SYNTH-VLKEB-style edit of its city with the portability question that follows from it. Drawn from the
world's own functions (``synthetic/world.py``), so no generated files are needed.
"""
import argparse
import random
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synthetic.world import (CAPTION_SRC, PORT_QUESTIONS, VLKEB_QUESTIONS, VQA_QUESTIONS, VQA_TYPES, build_world,  # noqa: E402
                             caption, portability_item, render_entity, vqa_answer)


def lines_for(world, e, rng: random.Random) -> list[tuple[str, str]]:
    out = [(VQA_QUESTIONS[t][0], vqa_answer(e, t)) for t in VQA_TYPES]
    out.append((CAPTION_SRC, caption(e)))
    out.append((VLKEB_QUESTIONS["city"][0], world.city(e)))
    out.append((VLKEB_QUESTIONS["country"][0], world.country(e)))
    alt = rng.choice(sorted(c for c in set(world.cities.values()) if c != world.city(e)))
    port = portability_item(world, e, "city", alt, rng)
    out.append((f"EDIT  {VLKEB_QUESTIONS['city'][1]}", f"{world.city(e)} -> {alt}"))
    short = next(qs[0] for qs in PORT_QUESTIONS.values() if port["port_q"] in qs)  # the shortest phrasing
    out.append((f"PORT  {short}", f"{port['port_a']}   (hop: {port['port_edit_q']})"))
    return out


def draw(out: Path, seed: int = 0, n: int = 4) -> Path:
    world = build_world(seed)
    rng = random.Random(f"{seed}:figure")
    entities = rng.sample(world.entities, n)
    fig = plt.figure(figsize=(13, 2.25 * n))
    grid = fig.add_gridspec(n, 3, width_ratios=[1, 1, 5.2], wspace=0.05, hspace=0.25)
    for row, e in enumerate(entities):
        for col, k in enumerate((0, 1)):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(render_entity(e, k, seed, size=64), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{e.id} k={k}" + (" (edit)" if k == 0 else " (rephrase)"), fontsize=7.5)
        ax = fig.add_subplot(grid[row, 2])
        ax.axis("off")
        for i, (q, a) in enumerate(lines_for(world, e, rng)):
            colour = "#a0522d" if q.startswith("EDIT") else "#1f5f99" if q.startswith("PORT") else "#222222"
            ax.text(0.0, 1 - i * 0.118, q, fontsize=7.8, color=colour, va="top", family="monospace")
            ax.text(0.64, 1 - i * 0.118, "-> " + a, fontsize=8.3, color=colour, va="top", weight="bold")
    fig.suptitle(f"The synthetic world (seed {seed}): what the tiny backbones see and are pretrained to answer; "
                 f"an edit and its portability question", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4, help="entities to show")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "world_samples.png"))
    a = p.parse_args(argv)
    print(draw(Path(a.out), a.seed, a.n))


if __name__ == "__main__":
    main()
