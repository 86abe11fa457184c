"""Report plots, rendered with matplotlib's object API (no pyplot global state, no display needed) and returned
as base64 PNG strings ready for <img src="data:image/png;base64,...">. Each returns None when there is
nothing to draw."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

# Trainer eval entries that describe the evaluation loop itself, not the model.
_EVAL_BOOKKEEPING = ("_runtime", "_per_second")
_ROLE_COLORS = {"teacher": "#4c72b0", "student_before": "#aaaaaa", "student_after": "#dd8452",
                "baseline": "#55a868"}
_OTHER_COLORS = ["#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(count: int, width: float = 4.4, height: float = 3.0) -> tuple[Figure, list]:
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def _series(entries: Sequence[Mapping[str, Any]], key: str, offset: float = 0.0) -> tuple[list, list]:
    points = [(e["step"] + offset, e[key]) for e in entries if _finite(e.get(key)) and _finite(e.get("step"))]
    return [p[0] for p in points], [p[1] for p in points]


def loss_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> str | None:
    """One panel per stage: the total training loss and each logged term ("loss/<term>") against the step."""
    stages = {name: [e for e in history if _finite(e.get("loss"))] for name, history in histories.items()}
    stages = {name: entries for name, entries in stages.items() if entries}
    if not stages:
        return None
    fig, axes = _grid(len(stages))
    for ax, (name, entries) in zip(axes, stages.items()):
        terms = sorted({k for e in entries for k in e if k.startswith("loss/")})
        ax.plot(*_series(entries, "loss"), label="total", linewidth=2, color="black")
        for term in terms:
            ax.plot(*_series(entries, term), label=term.removeprefix("loss/"), linewidth=1)
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def eval_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> str | None:
    """One panel per eval metric (eval_loss, ...), stages laid end to end on one step axis with their
    boundaries marked, so the effect of each stage on the eval sets reads left to right."""
    keys = sorted({k for history in histories.values() for e in history for k in e
                   if k.startswith("eval_") and not k.endswith(_EVAL_BOOKKEEPING) and _finite(e[k])})
    if not keys:
        return None
    fig, axes = _grid(len(keys))
    offsets, offset = {}, 0.0
    for name, history in histories.items():
        offsets[name] = offset
        offset += max((e["step"] for e in history if _finite(e.get("step"))), default=0)
    for ax, key in zip(axes, keys):
        for name, history in histories.items():
            xs, ys = _series(history, key, offsets[name])
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        for boundary in list(offsets.values())[1:]:
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(key)
        ax.set_xlabel("step (stages end to end)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def role_bars(metrics: Mapping[str, Mapping[str, float]], roles: Sequence[str], keys: Sequence[str]) -> str | None:
    """One panel per metric key, one bar per model role that has it (teacher, students, baseline)."""
    keys = [k for k in keys if any(_finite(metrics[r].get(k)) for r in roles)]
    if not keys:
        return None
    colors = {r: _ROLE_COLORS.get(r) or _OTHER_COLORS[i % len(_OTHER_COLORS)] for i, r in enumerate(roles)}
    fig, axes = _grid(len(keys), width=3.8, height=2.8)
    for ax, key in zip(axes, keys):
        present = [r for r in roles if _finite(metrics[r].get(key))]
        values = [metrics[r][key] for r in present]
        bars = ax.bar(range(len(present)), values, color=[colors[r] for r in present])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
        ax.set_xticks(range(len(present)), present, rotation=20, fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.margins(y=0.15)
    return _png(fig)
