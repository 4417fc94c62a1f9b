# SPDX-License-Identifier: Apache-2.0
"""``detrkit data synth`` (write a synthetic COCO-format dataset) and ``detrkit data check``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

_SEVERITY_LABEL = {"error": "ERROR", "warning": "warning", "info": "info"}


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser("data", help="dataset utilities")
    actions = parser.add_subparsers(dest="action", required=True)
    synth = actions.add_parser("synth", help="write a synthetic COCO-format dataset of shapes")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    synth.add_argument("--num-train", type=int, default=64, help="training images")
    synth.add_argument("--num-val", type=int, default=16, help="validation images")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the shapes")
    synth.add_argument(
        "--kind",
        choices=("shapes", "crowded"),
        default="shapes",
        help="shapes: 1-4 large shapes of 3 classes; crowded: ~9 mostly small, overlapping "
        "objects of 12 long-tailed classes per image",
    )
    synth.set_defaults(run=run_synth)
    _register_check(actions)


def _register_check(actions) -> None:
    check = actions.add_parser(
        "check",
        help="lint a COCO-format dataset (exit 1 on errors)",
        description="Report missing or corrupt images, duplicate or unknown ids, bad boxes, "
        "empty images and image formats the loader converts. Exit code 0: no errors (warnings "
        "allowed); 1: errors; 2: PATH or a split does not exist.",
    )
    check.add_argument("path", type=Path, help="dataset folder, or one annotation JSON file")
    check.add_argument(
        "--split",
        dest="splits",
        action="append",
        default=None,
        metavar="NAME",
        help="check only this split (repeatable; default: every annotations/instances_*.json)",
    )
    check.add_argument(
        "--no-images",
        dest="open_images",
        action="store_false",
        help="do not open image files (annotations and file existence only; fast)",
    )
    check.add_argument(
        "--images-dir", type=Path, default=None, metavar="DIR", help="use this images folder"
    )
    check.add_argument(
        "--json",
        dest="json_out",
        type=Path,
        default=None,
        metavar="OUT",
        help="also write the report as JSON to OUT",
    )
    check.add_argument(
        "--max-examples", type=int, default=5, metavar="N", help="examples shown per finding"
    )
    check.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="threads that open images (default: min(32, CPU cores + 4), Python's thread pool)",
    )
    check.set_defaults(run=run_check)


def run_synth(args) -> int:
    from detrkit.data.synth import write_synthetic_coco
    from detrkit.data.synth_crowded import write_crowded_coco

    write = write_crowded_coco if args.kind == "crowded" else write_synthetic_coco
    out = write(args.out, args.num_train, args.num_val, args.seed)
    print(f"synthetic dataset written to {out}", file=sys.stderr)
    return 0


def run_check(args) -> int:
    from detrkit.data.lint import check_dataset
    from detrkit.errors import UserError

    if args.max_examples < 0:
        raise UserError(f"--max-examples must be >= 0, got {args.max_examples}")
    report = check_dataset(
        args.path,
        args.splits,
        open_images=args.open_images,
        max_examples=args.max_examples,
        images_dir=args.images_dir,
        workers=args.workers,
        progress=True,
    )
    print(format_report(report))
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    return 1 if report.has_errors else 0


def format_report(report) -> str:
    """Human-readable ``LintReport``: per split a table of findings, then a summary line."""
    lines = [f"detrkit data check {report.root}"]
    for split in report.splits:
        lines += ["", f"[{split.split}] {split.annotation_file}"]
        lines.append(
            f"  images in {split.images_dir or '(not found)'}: {split.num_images} images, "
            f"{split.num_annotations} annotations"
        )
        if not split.findings:
            lines.append("  no problems found")
        for finding in split.findings:
            label = _SEVERITY_LABEL[finding.severity]
            lines.append(f"  {label:<8} {finding.code:<24} {finding.count:>7}  {finding.message}")
            if finding.examples:
                more = ", ..." if finding.count > len(finding.examples) else ""
                lines.append(f"{'':44}e.g. {', '.join(finding.examples)}{more}")
    lines += ["", _summary(report)]
    return "\n".join(lines)


def _summary(report) -> str:
    parts = []
    for severity in ("error", "warning", "info"):
        found = [f for split in report.splits for f in split.of(severity)]
        parts.append(f"{severity}: {len(found)} kinds, {sum(f.count for f in found)} items")
    verdict = "FAILED" if report.has_errors else "OK"
    opened = "image files opened" if report.images_opened else "image files not opened"
    return f"summary: {verdict}; {'; '.join(parts)}; {len(report.splits)} split(s), {opened}"
