"""The findings picture: questions by cells, each box coloured by its answer, disagreements framed.

It draws the Findings table (kmatrix.report.findings) so a pull request shows at a glance where
kernels differ: the same colour means the same answer (teal yes, sand no, OOM victims in
their role's colour), a red frame and ⚠ mark the questions where cells disagree, and each
box carries the short answer (the table below it has the numbers).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from kmatrix.report.findings import Answer, Row, answer_all
from kmatrix.results.schema import JSON
from kmatrix.results.view import cell_label

FILENAME = "chart-findings.svg"
YES, NO, NOT_MEASURED, OTHER = "#80cdc1", "#dfc27d", "#f0f0f0", "#dadaeb"
#: Lighter versions of the OOM chart's role colours: the text on them must stay readable.
ROLE_FILLS = {"hog": "#f4a6a6", "holder": "#a6c8ea", "bystander": "#b3e0b3", "none": "#cccccc"}
MIXED = "#d9b3e6"  # more than one role across repeats
DISAGREE = "#d62728"
LABEL_WIDTH = 30  # characters per line of a question
BOX_WIDTH = 14  # characters per line of an answer
MIN_WIDTH = 6.4  # inches


def answer_fill(key: str) -> str:
    """The colour of an answer (pure): by its comparison key, so equal answers match."""
    k = key.lower()
    if not k:
        return NOT_MEASURED
    if k.startswith("yes") or k == "true":
        return YES
    if k.startswith("no") or k == "false":
        return NO
    roles = {part.split()[0] for part in k.split(",") if part.strip()}
    if len(roles) == 1 and (role := roles.pop()) in ROLE_FILLS:
        return ROLE_FILLS[role]
    return MIXED if roles <= set(ROLE_FILLS) else OTHER


#: Kill orders written short enough for a box: bystander-3 → writer becomes b3→writer.
_COMPACT = (("bystander-", "b"), (" → ", "→"), ("ended: ", ""), (" 3/3", ""))


def short_answer(answer: Answer) -> str:
    """The box text (pure): the answer without its parenthesised numbers, wrapped."""
    text = answer.text.split(" (", 1)[0].split("; memfd freed", 1)[0].strip() or "—"
    for long, short in _COMPACT:
        text = text.replace(long, short)
    return "\n".join(textwrap.wrap(text, BOX_WIDTH, max_lines=3, placeholder="…"))


def question_label(row: Row) -> str:
    """The y-axis label of a row, ⚠ first when the cells disagree."""
    text = "\n".join(textwrap.wrap(row.question, LABEL_WIDTH))
    return f"⚠ {text}" if row.disagree else text


def findings_figure(cells: Sequence[JSON]) -> Figure:
    """The picture: one row per question (disagreements first), one column per cell."""
    rows = answer_all(cells)
    ncols, nrows = max(len(cells), 1), len(rows)
    # At least as wide as the four-column legend, which a one-cell picture would clip.
    fig = Figure(figsize=(max(MIN_WIDTH, 2.6 + 1.25 * ncols), 1.3 + 0.52 * nrows))
    ax = fig.subplots()
    for y, row in enumerate(rows):
        for x, answer in enumerate(row.answers):
            ax.add_patch(
                Rectangle((x, y), 1, 1, facecolor=answer_fill(answer.key), edgecolor="white")
            )
            ax.text(x + 0.5, y + 0.5, short_answer(answer), ha="center", va="center", fontsize=7)
        if row.disagree:
            frame = Rectangle((0, y), ncols, 1, fill=False, edgecolor=DISAGREE, linewidth=1.6)
            ax.add_patch(frame)
    ax.set_xlim(0, ncols)
    ax.set_ylim(nrows, 0)  # first question at the top
    ax.set_xticks([x + 0.5 for x in range(len(cells))], [cell_label(c) for c in cells])
    ax.xaxis.tick_top()
    ax.tick_params(axis="x", labelsize=8, length=0)
    ax.set_yticks([y + 0.5 for y in range(nrows)], [question_label(r) for r in rows])
    ax.tick_params(axis="y", labelsize=7, length=0)
    for label, row in zip(ax.get_yticklabels(), rows, strict=True):
        if row.disagree:
            label.set_color(DISAGREE)
    for side in ax.spines.values():
        side.set_visible(False)
    legend = [
        Patch(facecolor=YES, label="yes"),
        Patch(facecolor=NO, label="no"),
        *(Patch(facecolor=c, label=f"victim: {r}") for r, c in ROLE_FILLS.items() if r != "none"),
        Patch(facecolor=MIXED, label="victims vary"),
        Patch(facecolor=NOT_MEASURED, label="not measured"),
        Patch(facecolor="white", edgecolor=DISAGREE, label="⚠ cells disagree"),
    ]
    fig.legend(handles=legend, loc="lower center", ncols=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.3 / max(nrows, 1), 1, 1))
    return fig
