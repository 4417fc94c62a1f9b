# SPDX-License-Identifier: Apache-2.0
"""What an evaluation leaves behind: the COCO table, a results JSON, a metrics record, a curve."""

from __future__ import annotations

import logging
from pathlib import Path

from detrkit.engine.logging import JsonlWriter, read_jsonl
from detrkit.evaluation.coco_eval import CocoMetrics, write_results_json
from detrkit.visualize import plot_curves

logger = logging.getLogger(__name__)


def report_eval(
    metrics: CocoMetrics,
    results: list[dict],
    output_dir: Path,
    *,
    epoch: int,
    step: int,
    log: JsonlWriter,
) -> None:
    """Log the 12-number table, write ``results_val.json``, append to metrics, redraw curves.

    ``epoch`` is 1-based: the epoch the evaluated weights come from (0 = before training).
    """
    logger.info(
        "COCO evaluation after epoch %d (step %d):\n%s", epoch, step, metrics.format_table()
    )
    write_results_json(output_dir / "results_val.json", results)
    log.write({"kind": "eval", "epoch": epoch, "step": step, **metrics.as_dict()})
    plot_curves(read_jsonl(log.path), output_dir / "curves.png")
