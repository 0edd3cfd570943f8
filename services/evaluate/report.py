"""The evaluation's outputs: eval.md (the paper's table), eval.json and neighbours.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from services.evaluate import warmup
from services.evaluate.evaluate import FEATURE_SOURCES, POPULARITY, TASKS

COLUMNS = (*FEATURE_SOURCES, POPULARITY)


def markdown_table(results: list[dict]) -> str:
    """Rows = tasks, columns = feature sources, then n (projects, or users for recall).
    A cell whose n differs from its row's (latent factors exist for fewer projects)
    carries its own n."""
    cells = {(r["task"], r["features"]): r for r in results}
    lines = ["| task | " + " | ".join(COLUMNS) + " | n |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for task in TASKS:
        row_n = next((cells[task, s]["n"] for s in COLUMNS if (task, s) in cells), 0)
        values = [_cell(cells.get((task, source)), row_n) for source in COLUMNS]
        lines.append(f"| {task} | " + " | ".join(values) + f" | {row_n} |")
    return "\n".join(lines) + "\n"


def _cell(row: dict | None, row_n: int) -> str:
    if row is None:
        return "–"
    text = "nan" if math.isnan(row["score"]) else f"{row['score']:.3f}"
    return text if row["n"] == row_n else f"{text} (n={row['n']})"


def write_markdown(path: Path, world: dict, results: list[dict]) -> str:
    table = markdown_table(results)
    seconds = world.get("seconds", {})
    about = ", ".join(f"{key} {value}" for key, value in world.items() if key != "seconds")
    text = (f"# Feature comparison on held-out projects\n\n{table}\n"
            f"World: {about}.\n\nDefinitions: docs/evaluation.md. CNN features are the "
            "penultimate layer (global average pool), L2-normalized.\n"
            + timing_table(seconds))
    curve = warmup.markdown(results)
    text += f"\n{curve}" if curve else ""
    Path(path).write_text(text)
    return table


def timing_table(seconds: dict) -> str:
    """Wall seconds per source: training (0 for frozen or hand-crafted features) and
    computing the features of every evaluated image."""
    if not seconds:
        return ""
    lines = ["", "| source | train s | embed s |", "|---|---|---|"]
    lines += [f"| {source} | {t['train']:.1f} | {t['embed']:.1f} |"
              for source, t in seconds.items()]
    return "\n".join(lines) + "\n"


def write_json(path: Path, world: dict, results: list[dict]) -> None:
    # NaN is not JSON; a score that could not be computed is written as null.
    clean = [{**r, "score": None if math.isnan(r["score"]) else r["score"]} for r in results]
    Path(path).write_text(json.dumps({"world": world, "results": clean}, indent=2,
                                     default=_plain) + "\n")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")


def plot_neighbours(path: Path, found: dict, world: dict | None = None) -> Path:
    """One row per (query, source): the query, then its nearest held-out neighbours,
    captioned with hidden style and category (green where the style matches)."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot's import
    import matplotlib.pyplot as plt

    sources = [s for s in COLUMNS if s in found["neighbours"]]
    queries = found["queries"]
    k = next(iter(found["neighbours"].values())).shape[1]
    fig, axes = plt.subplots(len(queries) * len(sources), k + 1,
                             figsize=(1.4 * (k + 1) + 1.6, 1.45 * len(queries) * len(sources)),
                             squeeze=False)
    for qn, query in enumerate(queries):
        for sn, source in enumerate(sources):
            line = axes[qn * len(sources) + sn]
            rows = [query, *found["neighbours"][source][qn]]
            for col, row in enumerate(rows):
                _tile(line[col], _image(found, row), found, row, query, col)
            line[0].set_ylabel(source, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return Path(path)


def _image(found: dict, row: int):
    """The project's image through the evaluation's reader; grey when it is unreadable."""
    from PIL import Image

    from shared import images

    reader = found.get("reader") or images.local_files()
    try:
        return reader.open(found["paths"][row])
    except images.ImageError:
        return Image.new("RGB", (8, 8), (128, 128, 128))


def _tile(axis, image, found, row, query, col) -> None:
    axis.imshow(image.convert("RGB"))
    axis.set_xticks([])
    axis.set_yticks([])
    same = found["style"][row] == found["style"][query]
    caption = f"s{found['style'][row]} c{found['category'][row]}"
    colour = "black" if col == 0 else ("green" if same else "red")
    axis.set_title(("query " if col == 0 else "") + caption, fontsize=6, color=colour)
