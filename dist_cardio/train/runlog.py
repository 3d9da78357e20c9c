"""Rank 0's outputs of a pretraining run: the progress line, ``metrics.jsonl``, TensorBoard, ``loss.png``,
and the collapse check (embedding spread after warmup)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dist_cardio.atomic import atomic_write_text
from dist_cardio.train.losses import collapsed_loss


class RunLog:
    """Rank 0's outputs: progress line, ``metrics.jsonl``, TensorBoard. Other ranks log nothing."""

    def __init__(self, out: Path, enabled: bool, start_step: int, total_steps: int) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.metrics = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events logged after the checkpoint it resumes from.
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _truncate(self, step: int) -> None:
        """Keep only rows up to ``step`` (a run killed after its last checkpoint logged steps it will redo)."""
        if not self.metrics.exists():
            return
        rows = [line for line in self.metrics.read_text().splitlines() if _row_step(line) <= step]
        atomic_write_text(self.metrics, "".join(r + "\n" for r in rows))

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def row(self, row: dict[str, float | int]) -> None:
        if not self.enabled:
            return
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key in ("loss", "spread", "lr", "images_per_s", "data_s", "step_s", "knn_auroc", "knn_accuracy"):
            if key in row:
                self.tb.add_scalar(f"pretrain/{key}", row[key], row["step"])
        eta = (self.total - row["step"]) * row["step_s"]
        knn = f" | k-NN AUROC {row['knn_auroc']:.3f}" if "knn_auroc" in row else ""
        self.text(
            f"step {row['step']}/{self.total} | loss {row['loss']:.4f} | spread {row['spread']:.3f}{knn} | lr {row['lr']:.4g} | "
            f"{row['images_per_s']:.1f} img/s | data {1000 * row['data_s']:.0f} ms | "
            f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


COLLAPSED_SPREAD = 0.05
"""Below this :func:`~dist_cardio.train.losses.embedding_spread` after warmup, the run has collapsed."""


def collapse_warning(spread: float, loss: float, global_batch: int, kind: str = "nt_xent") -> str:
    """What a collapsed run means and what to change (printed once, after warmup)."""
    return (
        f"warning: the embeddings have collapsed (spread {spread:.3f} < {COLLAPSED_SPREAD}; loss {loss:.4f}, chance "
        f"ln(2·{global_batch} − {1 if kind == 'nt_xent' else 2}) = {collapsed_loss(kind, global_batch):.4f}): every "
        "image maps to about the same point, "
        "so the network is no longer learning. The views are too different for this model and input size "
        "(raise augment.crop_scale's lower bound, soften colour jitter, or use a larger model.input_size) "
        "or the LR is too high (lower schedule.base_lr)."
    )


def _row_step(line: str) -> float:
    """A metrics row's step; a torn last line (killed mid-write) counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def plot_loss_curve(metrics: Path, png: Path) -> None:
    """``loss.png`` from ``metrics.jsonl`` (the whole run, resumed parts included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax, ax_spread) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1.4))
    ax.plot(steps, [r["loss"] for r in rows], lw=1.2)
    ax.set(ylabel="contrastive loss", title="SimCardioNet pretraining")
    ax.grid(alpha=0.3)
    ax_spread.plot(steps, [r.get("spread", float("nan")) for r in rows], lw=1.2, color="tab:green")
    ax_spread.axhline(COLLAPSED_SPREAD, color="tab:red", lw=0.8, ls="--", label="collapsed below")
    ax_spread.set(xlabel="step", ylabel="embedding spread", ylim=(0, None))
    ax_spread.legend(fontsize=8, loc="upper right")
    ax_spread.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


__all__ = ["RunLog", "COLLAPSED_SPREAD", "collapse_warning", "plot_loss_curve"]
