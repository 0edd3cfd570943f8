"""Loss curves as a PNG, drawn headless (matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Train/val loss per epoch on the left, the held-out score on the right."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    if any("val_loss" in row for row in history):
        left.plot(epochs, [row.get("val_loss") for row in history], marker="o", label="val")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    left.legend()
    score_keys = sorted({k for row in history for k in row
                         if k.startswith("val_") and k not in ("val_loss", "val_score")})
    for key in score_keys:
        right.plot(epochs, [row.get(key) for row in history], marker="o", label=key[4:])
    right.set(xlabel="epoch", title="held-out")
    if score_keys:
        right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
