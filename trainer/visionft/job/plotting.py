"""The loss plot written to the output folder at the end of a run: training and evaluation loss against the
step and, for a run with evaluation, its headline metric over the steps beside them."""

from __future__ import annotations

from pathlib import Path


def save_loss_curve(
    log_history: list[dict],
    path: str | Path,
    title: str = "training loss",
    metric: str | None = None,
    base: float | None = None,
) -> Path | None:
    """Plots training (and, when logged, evaluation) loss against the step and writes a PNG.

    Args:
        log_history (list[dict]): ``trainer.state.log_history``: dicts with ``step`` and ``loss`` /
            ``eval_loss`` / ``eval_<metric>``.
        path (str | Path): the PNG to write (its folder is created).
        title (str): the loss plot's title. Default: "training loss".
        metric (str | None): the headline metric, drawn in a second panel from its ``eval_<metric>``
            entries. Default: None (the loss only).
        base (float | None): the base model's value of ``metric``, drawn at step 0. Default: None.

    Returns:
        Path | None: ``path``, or None when the history holds no loss to plot.
    """
    import matplotlib.pyplot as plt

    fig = draw(log_history, title, metric, base)
    if fig is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def draw(log_history: list[dict], title: str = "training loss", metric: str | None = None, base=None):
    """The figure ``save_loss_curve`` writes (arguments as there), or None when there is no loss to plot.
    The caller closes it."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a pod or in CI
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    key = f"eval_{metric}" if metric else None
    scores = [(e["step"], e[key]) for e in log_history if key and key in e and "step" in e]
    if base is not None:
        scores.insert(0, (0, base))
    if not train and not evals:
        return None
    panels = 2 if metric and scores else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.5)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        ax.plot(*zip(*scores, strict=True), "o-", color="tab:green", label=str(metric), linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel(str(metric))
        ax.set_title(f"held-out {metric} (step 0: the base model)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
