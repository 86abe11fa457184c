"""RUN_DIR/report.html: one self-contained page (inline CSS, plots inlined as base64 PNG, no external request)
that answers "is the small model good enough, how much smaller and faster is it". It renders whatever the run
has and lists what it lacks."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from lmdistill.eval.evaluate import KNOWN_ROLES
from lmdistill.eval.plots import eval_curves, loss_curves, role_bars
from lmdistill.eval.run_files import RunData, load_run
from lmdistill.eval.seeds import SeedRuns
from lmdistill.export import format_value

REPORT_FILE = "report.html"
TIMING_NOISE = 0.10
SIZE_SPEED_KEYS = ("params", "disk_mb", "memory_mb", "tokens_per_s/batch1", "tokens_per_s/batch8")
# Metrics where a smaller number is the better model; every other metric is better when larger.
_LOWER_IS_BETTER = ("perplexity", "kl_teacher_student", "params", "disk_mb", "memory_mb")
_HEADLINE_METRICS = ("rouge_l", "exact_match", "rouge_l_continuation")
_LABELS = {"rouge_l": "ROUGE-L", "exact_match": "exact match",
           "rouge_l_continuation": "ROUGE-L on held-out text continuations"}
_HINTS = {"kl_teacher_student": " KL(teacher || student), nats per token",
          "rouge_l": " greedy answers to the eval prompts vs the reference answers",
          "rouge_l_continuation": " greedy continuations of the first part of each held-out text vs the rest of it"}
_SAMPLE_MODES = {"answer": "answers to eval prompts", "continuation": "continuations of held-out text prefixes (the "
                 "prompt is the first part of an eval text)"}
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child, table.samples td { text-align: left; }
table.samples td { white-space: pre-wrap; max-width: 360px; }
thead th { background: #f2f2f2; } .better { color: #1a7f37; } .worse { color: #b42318; }
.headline { font-size: 1.15em; background: #f6f8fa; padding: 0.7em 1em; border-left: 4px solid #dd8452; }
img { max-width: 100%; } .missing { color: #8a6d3b; } pre { background: #f6f8fa; padding: 0.8em; overflow: auto; }
"""


def _lower_is_better(key: str) -> bool:
    return key.split("/")[0] in _LOWER_IS_BETTER


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ordered_roles(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Known roles in table order (teacher, student before, student after, baseline), then the others."""
    return [r for r in KNOWN_ROLES if r in metrics] + sorted(r for r in metrics if r not in KNOWN_ROLES)


def _student_role(metrics: Mapping[str, Mapping[str, float]]) -> str | None:
    others = [r for r in ordered_roles(metrics) if r not in KNOWN_ROLES]
    for role in ["student_after", *others, "student_before"]:
        if role in metrics:
            return role
    return None


def _times(ratio: float, more: str, less: str) -> str:
    return f"{ratio:.1f}x {more}" if ratio >= 1 else f"{1 / ratio:.1f}x {less}"


def headline(metrics: Mapping[str, Mapping[str, float]], metric: str | None = None) -> str | None:
    """The one-sentence answer, e.g. "student_after is 5.1x smaller, 3.8x faster (batch 1), keeps 92% of the
    teacher's ROUGE-L". None without both a teacher and a student."""
    teacher, role = metrics.get("teacher"), _student_role(metrics)
    if teacher is None or role is None:
        return None
    student, parts = metrics[role], []
    if _finite(teacher.get("params")) and _finite(student.get("params")) and student["params"] > 0:
        parts.append(_times(teacher["params"] / student["params"], "smaller", "larger") + " (parameters)")
    speed = "tokens_per_s/batch1"
    if _finite(teacher.get(speed)) and _finite(student.get(speed)) and teacher[speed] > 0:
        parts.append(_times(student[speed] / teacher[speed], "faster", "slower") + " (generation, batch 1)")
    for key in [metric] if metric else _HEADLINE_METRICS:
        if _finite(teacher.get(key)) and _finite(student.get(key)) and teacher[key] > 0:
            parts.append(f"keeps {100 * student[key] / teacher[key]:.0f}% of the teacher's {_LABELS.get(key, key)}")
            break
    return f"{role} is " + ", ".join(parts) + "." if parts else None


def _compare(key: str, mine: float, theirs: float) -> tuple[str, str]:
    # Timings of two same-size models differ by run-to-run noise; call them equal unless 10% apart.
    tolerance = TIMING_NOISE * max(abs(mine), abs(theirs)) if key.startswith("tokens_per_s") else 0.0
    if abs(mine - theirs) <= tolerance:
        return "equal", ""
    better = mine < theirs if _lower_is_better(key) else mine > theirs
    return ("better", "better") if better else ("worse", "worse")


def baseline_verdict(metrics: Mapping[str, Mapping[str, float]], seeds: int = 1) -> str | None:
    """One sentence on the distilled student against the CE-only baseline over their shared quality metrics,
    e.g. "Against the CE-only baseline, student_after is better on 2 of 3 quality metrics (exact_match,
    perplexity/domain) and worse on rouge_l." None unless both were evaluated. With several `seeds`, `metrics` are
    the means over them and the sentence says so."""
    mine, theirs = metrics.get("student_after"), metrics.get("baseline")
    if mine is None or theirs is None:
        return None
    keys = [k for k in mine if k not in SIZE_SPEED_KEYS and _finite(mine[k]) and _finite(theirs.get(k))]
    if not keys:
        return None
    verdicts = {k: _compare(k, mine[k], theirs[k])[0] for k in keys}
    better = [k for k in keys if verdicts[k] == "better"]
    worse = [k for k in keys if verdicts[k] == "worse"]
    over = f"Over {seeds} training seeds (means), against" if seeds > 1 else "Against"
    text = f"{over} the CE-only baseline, student_after is better on {len(better)} of {len(keys)} quality metrics"
    text += f" ({', '.join(better)})" if better else ""
    return text + (f" and worse on {', '.join(worse)}." if worse else ".")


def metrics_table(metrics: Mapping[str, Mapping[str, float]], keys: Sequence[str],
                  spread: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """HTML table, metrics as rows and roles as columns; with both a distilled student and a baseline, a last
    column says whether the distilled student is better, direction-aware (lower perplexity and KL win). With
    `spread` (standard deviations over seeds; `metrics` are then their means), each cell reads "mean ± std"."""
    roles = ordered_roles(metrics)

    def cell(role: str, key: str) -> str:
        if key not in metrics[role]:
            return "–"
        text = format_value(metrics[role][key])
        if spread is not None and key in spread.get(role, {}):
            text += f" ± {format_value(spread[role][key])}"
        return html.escape(text)

    versus = "student_after" in metrics and "baseline" in metrics
    head = "".join(f"<th>{html.escape(r)}</th>" for r in roles) + ("<th>after vs baseline</th>" if versus else "")
    rows = []
    for key in keys:
        hint = _HINTS.get(key.split("/")[0], "") + (" (lower is better)" if _lower_is_better(key) else "")
        cells = "".join(f"<td>{cell(r, key)}</td>" for r in roles)
        if versus:
            mine, theirs = metrics["student_after"].get(key), metrics["baseline"].get(key)
            word, css = _compare(key, mine, theirs) if _finite(mine) and _finite(theirs) else ("–", "")
            cells += f'<td class="{css}">{word}</td>'
        rows.append(f"<tr><td>{html.escape(key)}<small>{hint}</small></td>{cells}</tr>")
    return (f'<table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _stages_table(stages: Sequence[Mapping[str, object]]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(s.get('name', '?')))}</td><td>{html.escape(str(s.get('status', '?')))}"
                   f"</td><td>{html.escape(str(s.get('metric_name', '')))}</td>"
                   f"<td>{html.escape(format_value(s['best_metric'])) if 'best_metric' in s else '–'}</td></tr>"
                   for s in stages)
    return ('<table class="stages"><thead><tr><th>stage</th><th>status</th><th>metric</th><th>best</th></tr>'
            f"</thead><tbody>{rows}</tbody></table>")


def _samples_section(samples: Sequence[Mapping[str, object]], limit: int) -> str:
    """The latest evaluation's samples (last stage and step written), up to `limit` prompts."""
    last = (samples[-1].get("stage"), samples[-1].get("step"))
    chosen = [s for s in samples if (s.get("stage"), s.get("step")) == last][:limit]
    rows = "".join(f"<tr><td>{html.escape(str(s.get('prompt', '')))}</td><td>{html.escape(str(s.get('teacher', '')))}"
                   f"</td><td>{html.escape(str(s.get('student', '')))}</td></tr>" for s in chosen)
    caption = f"stage {last[0]}, step {last[1]}; {len(samples)} samples in samples.jsonl"
    modes = [_SAMPLE_MODES[m] for m in dict.fromkeys(s.get("mode") for s in chosen) if m in _SAMPLE_MODES]
    caption += f"; prompts: {' and '.join(modes)}" if modes else ""
    return (f"<p>{html.escape(caption)}</p><table class=\"samples\"><thead><tr><th>prompt</th><th>teacher</th>"
            f"<th>student</th></tr></thead><tbody>{rows}</tbody></table>")


def _img(png: str | None, alt: str, absent: str) -> str:
    if png is None:
        return f'<p class="missing">{html.escape(absent)}</p>' if absent else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def _eval_sets_note(config_yaml: str | None) -> str:
    """Where the eval sets came from, when the run held them out of its training sources (no eval set given)."""
    config = yaml.safe_load(config_yaml) if config_yaml else None
    data = config.get("data", {}) if isinstance(config, dict) else {}
    share = data.get("eval_holdout", 0)
    if data.get("eval") or not share:
        return ""
    names = ", ".join(data.get("sources", {}))
    return (f"<p>Eval sets: {share:.0%} of the rows of each training source ({html.escape(names)}), held out and "
            "never trained on (data.eval_holdout).</p>")


def _seeds_note(seeds: SeedRuns) -> str:
    listed = ", ".join(map(str, seeds.seeds))
    if len(seeds.seeds) == 1:
        return (f"<p>One training seed ({listed}), so no spread: a tiny model's scores move between seeds; "
                "<code>lmdistill demo --seeds K</code> gives the mean ± std over K of them.</p>")
    return (f"<p>Mean ± sample standard deviation over {len(seeds.seeds)} training seeds ({listed}); each seed "
            f"trained and evaluated the students anew. Seed {seeds.seeds[0]}'s run alone follows the plot.</p>")


def _keys(metrics: Mapping[str, Mapping[str, float]]) -> tuple[list[str], list[str]]:
    """(quality metrics, size and speed metrics) that any role has, in table order."""
    all_keys = list(dict.fromkeys(k for r in ordered_roles(metrics) for k in metrics[r]))
    return [k for k in all_keys if k not in SIZE_SPEED_KEYS], [k for k in SIZE_SPEED_KEYS if k in all_keys]


def render_report(run: RunData, headline_metric: str | None = None, max_samples: int = 6) -> str:
    """The whole report page as an HTML string. A run repeated over seeds (seeds.json) shows means ± standard
    deviations, and its summary sentences are about the means."""
    repeated = run.seeds is not None and len(run.seeds.seeds) > 1
    metrics, spread = run.seeds.mean_std() if repeated else (run.metrics, None)
    roles = ordered_roles(metrics)
    quality, size_speed = _keys(metrics)
    verdict = baseline_verdict(metrics, seeds=len(run.seeds.seeds) if repeated else 1)
    summary = [s for s in (headline(metrics, headline_metric), verdict) if s]
    parts = [f"<h1>Distillation report</h1><p>{html.escape(str(run.run_dir))}</p>",
             f'<p class="headline">{"<br>".join(html.escape(s) for s in summary)}</p>' if summary else ""]
    if run.stages:
        parts += ["<h2>Stages</h2>", _stages_table(run.stages)]
    parts.append("<h2>Evaluation: teacher, student before, student after, baseline</h2>")
    parts.append(_eval_sets_note(run.config_yaml))
    parts.append(_seeds_note(run.seeds) if run.seeds is not None else "")
    parts.append(metrics_table(metrics, quality, spread) if quality else '<p class="missing">No quality metrics.</p>')
    parts.append(_img(role_bars(metrics, roles, quality[:9]), "quality metrics per model", ""))
    if repeated and run.metrics:
        first_seed = metrics_table(run.metrics, _keys(run.metrics)[0])
        parts += [f"<h3>Training seed {run.seeds.seeds[0]} alone</h3>", first_seed]
    parts.append("<h2>Size and speed</h2>")
    if size_speed:
        parts += [metrics_table(metrics, size_speed, spread),
                  _img(role_bars(metrics, roles, size_speed), "size and speed", "")]
    else:
        parts.append('<p class="missing">No size or speed measured.</p>')
    parts += ["<h2>Training loss per stage and per term</h2>",
              _img(loss_curves(run.histories), "training loss curves", "No training loss was logged."),
              "<h2>Eval metrics per stage</h2>",
              _img(eval_curves(run.histories), "eval metrics per stage", "No evaluation was logged during training.")]
    parts.append("<h2>Samples: teacher vs student</h2>")
    parts.append(_samples_section(run.samples, max_samples) if run.samples
                 else '<p class="missing">No samples were generated.</p>')
    if run.missing:
        items = "".join(f"<li>{html.escape(m)}</li>" for m in run.missing)
        parts.append(f'<h2>Not in this run</h2><ul class="missing">{items}</ul>')
    if run.config_yaml is not None:
        parts.append(f"<h2>Config</h2><details><summary>lmdistill_config.yaml</summary>"
                     f"<pre>{html.escape(run.config_yaml)}</pre></details>")
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>lmdistill report</title>'
            f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(run_dir: str | Path, headline_metric: str | None = None, max_samples: int = 6) -> Path:
    """Build RUN_DIR/report.html from the run's files (atomically: temp file + rename) and return its path."""
    run = load_run(run_dir)
    path = run.run_dir / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(render_report(run, headline_metric, max_samples), encoding="utf-8")
    os.replace(tmp, path)
    return path
