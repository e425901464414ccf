"""The loss-curve PNG written to the output folder at the end of a run."""

from __future__ import annotations

from pathlib import Path


def save_loss_curve(log_history: list[dict], path: str | Path, title: str = "training loss") -> Path | None:
    """Plots training (and, when logged, evaluation) loss against the step and writes a PNG.

    Args:
        log_history (list[dict]): ``trainer.state.log_history``: dicts with ``step`` and ``loss`` /
            ``eval_loss``.
        path (str | Path): the PNG to write (its folder is created).
        title (str): the plot title. Default: "training loss".

    Returns:
        Path | None: ``path``, or None when the history holds no loss to plot.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on a pod or in CI
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="train", linewidth=1.5)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval", linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
