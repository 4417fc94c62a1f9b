# SPDX-License-Identifier: Apache-2.0
"""Loading a golden case and running detrkit on it (shared by the golden tests)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from detrkit.config.build import build_criterion, build_model, build_postprocess
from detrkit.config.schema import ExperimentConfig
from detrkit.convert.official_names import official_loss, official_match_path, official_output
from detrkit.convert.rules import ConversionResult, convert_state_dict
from detrkit.convert.sources import SourceFormat, source_for_repo
from detrkit.errors import UserError
from detrkit.structures import DetectorOutput, ImageBatch, Target

ROOT = Path(__file__).resolve().parents[2]
# The cases shipped with the repository; ``DETRKIT_GOLDEN_DIR`` points the runner at another folder.
SHIPPED_DIR = ROOT / "tests" / "golden" / "cases"
GOLDEN_DIR = Path(os.environ.get("DETRKIT_GOLDEN_DIR", SHIPPED_DIR)).resolve()
_NOT_CASES = {"inputs.json"}

# Formats whose runner is not built yet, with what is missing (docs/golden.md).
# Co-DETR cases have their own runners: the mmdetection layout has no official ``args``.
_CODETR_DINO = "Co-DINO cases run in tests/golden/test_codetr_dino.py"
_CODETR_DEFORMABLE = "Co-Deformable-DETR cases run in tests/golden/test_codetr_deformable.py"
_HF_RUNNER = "transformers cases run in tests/golden/test_hf.py"


def list_cases(directory: Path | None = None) -> list[Path]:
    """Every case json in ``directory`` (default the golden folder) and its subfolders."""
    root = GOLDEN_DIR if directory is None else directory
    return sorted(p for p in root.rglob("*.json") if p.name not in _NOT_CASES)


def case_id(path: Path) -> str:
    """A readable test id: the case's path below the golden folder, e.g. ``hf/hf_detr_r18``."""
    try:
        relative = path.relative_to(GOLDEN_DIR)
    except ValueError:
        relative = Path(path.name)
    return relative.with_suffix("").as_posix()


@dataclass(frozen=True)
class CaseFormat:
    """Which of the three golden formats a case json is in, and what detrkit still lacks to
    run it (empty when it can)."""

    name: str
    missing: str = ""


def case_format(spec: dict) -> CaseFormat:
    """Detect the format from the json's own fields; a json of none of them is an error, so a
    stray file is never mistaken for a passing case."""
    if "transformers" in spec:
        return CaseFormat("hf", _HF_RUNNER)
    reference = spec.get("reference")
    if isinstance(reference, dict) and reference.get("repo") == "Sense-X/Co-DETR":
        head = spec.get("config", {}).get("model", {}).get("query_head", {})
        dino = head.get("type") == "CoDINOHead"
        return CaseFormat("codetr", _CODETR_DINO if dino else _CODETR_DEFORMABLE)
    if "repo" in spec and "args" in spec:
        if source_for_repo(spec["repo"]) is None:
            return CaseFormat("official", f"repo '{spec['repo']}' is not supported by detrkit yet")
        return CaseFormat("official")
    raise ValueError(
        "not a golden case in any known format (official: 'repo' + 'args'; codetr: "
        "'reference.repo' == 'Sense-X/Co-DETR'; hf: 'transformers')"
    )


@functools.lru_cache(maxsize=4)
def _refgen(directory: Path):
    spec = importlib.util.spec_from_file_location(
        f"refgen_{abs(hash(directory))}", directory / "refgen.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_state_dict(spec: dict, directory: Path) -> dict[str, torch.Tensor]:
    """Regenerate the official-layout weights with the golden folder's own ``refgen``."""
    refgen = _refgen(directory)
    state = {}
    for entry in spec["state_dict"]:
        if "alias_of" not in entry:
            state[entry["key"]] = torch.from_numpy(
                refgen.weight_values(entry["key"], entry["shape"])
            )
    for entry in spec["state_dict"]:
        if "alias_of" in entry:
            state[entry["key"]] = state[entry["alias_of"]]
    return state


def _inputs_file(spec: dict) -> str:
    """The case's inputs file: ``inputs`` names it, or describes it as a dict whose ``file``
    starts with the path it was written to (the folder holds it under its base name)."""
    inputs = spec.get("inputs", "inputs.safetensors")
    if isinstance(inputs, dict):
        return Path(inputs["file"].split()[0]).name
    return inputs


@dataclass
class GoldenCase:
    """One recorded case with its detrkit model built and loaded."""

    path: Path
    spec: dict
    source: SourceFormat | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    official_state: dict[str, torch.Tensor] = field(default_factory=dict)
    conversion: ConversionResult | None = None
    model: torch.nn.Module | None = None
    unsupported: str = ""

    @classmethod
    def load(cls, path: Path) -> GoldenCase:
        spec = json.loads(path.read_text())
        fmt = case_format(spec)
        if fmt.missing:
            return cls(path, spec, None, unsupported=fmt.missing)
        case = cls(path, spec, source_for_repo(spec["repo"]))
        case.tensors = load_file(str(path.with_suffix(".safetensors")))
        case.inputs = load_file(str(path.parent / _inputs_file(spec)))
        try:
            case.config = case.source.config_from_args(spec["args"])
        except UserError as error:  # an option detrkit does not support (e.g. --masks)
            case.source, case.unsupported = None, str(error)
            return case
        if case.source.original_bugs is not None:
            # The cases record the originals as they are, including bugs detrkit fixes.
            case.config = case.source.original_bugs(case.config)
        case.official_state = official_state_dict(spec, path.parent)
        case.conversion = convert_state_dict(
            case.official_state, case.source.rules_for(spec["args"]), case.source.splits
        )
        torch.manual_seed(0)
        case.model = build_model(case.config.model)
        case.model.load_state_dict(case.conversion.state_dict, strict=True)
        return case

    @property
    def num_layers(self) -> int:
        return self.config.model.decoder.num_layers

    def batch(self) -> ImageBatch:
        batch = inputs_batch(self.inputs)
        # What the original consumed besides the inputs file (SMCA reads each unpadded size).
        recorded = [self.tensors.get(f"input.size.{i}") for i in range(len(batch.pixels))]
        if all(size is not None for size in recorded):
            batch = ImageBatch(batch.pixels, batch.padding_mask, torch.stack(recorded))
        return batch

    def targets(self) -> list[Target]:
        count = len([k for k in self.inputs if k.startswith("image.")])
        return [
            Target(self.inputs[f"target.{i}.labels"], self.inputs[f"target.{i}.boxes"], image_id=i)
            for i in range(count)
        ]

    @functools.cached_property
    def eval_output(self) -> DetectorOutput:
        self.model.eval()
        with torch.no_grad():
            return self.model(self.batch())

    def eval_output_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self._output_pairs("eval.f32.out.", self.eval_output)

    def train_output_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Our training-mode outputs against every output the original's training forward
        produced. The cases store ``train.f32.out.*`` only where it differs from eval; where
        ``runs.f32.train_outputs`` says an output is bitwise equal to eval, the recorded eval
        tensor is the training reference."""
        output = self._train[0]
        pairs = {}
        for path, info in self.spec["runs"]["f32"]["train_outputs"].items():
            mode = "eval" if info["bitwise_equal_to_eval"] else "train"
            name = f"{mode}.f32.out.{path}"
            assert name in self.tensors, f"train output {path}: {name} not recorded"
            ref = official_output(path, self.num_layers)
            assert ref is not None, f"unmapped official output {path}"
            ours = getattr(output.group(ref.group), ref.field)[ref.layer].detach()
            pairs[f"train.f32.out.{path}"] = (ours, self.tensors[name])
        return pairs

    def _output_pairs(self, prefix: str, output: DetectorOutput):
        pairs = {}
        names = {group.name for group in output.groups}
        for name, recorded in self.tensors.items():
            if not name.startswith(prefix):
                continue
            ref = official_output(name[len(prefix) :], self.num_layers)
            assert ref is not None, f"unmapped official output {name}"
            source = output
            if ref.group not in names:
                # Schemes do nothing in eval mode: H-DETR records empty one-to-many outputs
                # there, MS-DETR its (dropout-free, hence equal) training-mode predictions.
                if recorded.shape[1] == 0:
                    continue
                source = self._train[0]
            group = source.group(ref.group)
            pairs[name] = (getattr(group, ref.field)[ref.layer].detach(), recorded)
        return pairs

    def postprocess_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Our and the recorded detections of every image. Where the case records each
        detection's ``flat_index`` (query * logits + class), both sides are put in flat-index
        order first: a top-k's order is unspecified (SMCA takes an unsorted one) and near-ties
        may swap, so detections are compared as sets keyed by that index."""
        inference = self.eval_output.for_inference()
        postprocess = build_postprocess(self.config.model)
        detections = postprocess(inference, self.inputs["orig_sizes"])
        num_logits = inference.logits.shape[-1]
        pairs = {}
        for image, det in enumerate(detections):
            prefix = f"eval.f32.post.{image}"
            ours = {"scores": det.scores, "labels": det.labels, "boxes": det.boxes_xyxy}
            recorded = {key: self.tensors.get(f"{prefix}.{key}") for key in ours}
            flat_index = self.tensors.get(f"{prefix}.flat_index")
            if flat_index is not None and det.query_index is not None:
                our_index = det.query_index * num_logits + det.labels
                pairs[f"{prefix}.flat_index"] = (our_index.sort().values, flat_index.sort().values)
                ours = {k: v[our_index.argsort()] for k, v in ours.items()}
                recorded = {
                    k: None if v is None else v[flat_index.argsort()] for k, v in recorded.items()
                }
            for key, value in ours.items():
                if recorded[key] is not None:
                    # Some originals store labels as floats (multi-scale SMCA).
                    pairs[f"{prefix}.{key}"] = (value.to(recorded[key].dtype), recorded[key])
        return pairs

    @functools.cached_property
    def _train(self):
        # A training forward updates trainable BatchNorm statistics: record eval outputs first,
        # whatever order the tests run in.
        _ = self.eval_output
        self.model.train()
        criterion = build_criterion(self.config.model)
        output = self.model(self.batch(), self.targets())
        losses = criterion(output, self.targets())
        return output, criterion, losses

    def train_losses(self):
        _, _, losses = self._train
        return losses.terms, losses.total

    def loss_names(self) -> dict[str, str]:
        recorded = self.spec["runs"]["f32"]["losses"]
        mapped = {name: official_loss(name, self.num_layers) for name in recorded}
        return {k: v for k, v in mapped.items() if v is not None}

    def match(self, call: dict):
        where = official_match_path(call["path"], self.num_layers)
        if where is None:
            return None
        output, criterion, _ = self._train
        group = output.group(where[0])
        assigner = criterion.assigner_of(group)
        targets = criterion.group_targets(group, self.targets())
        boxes = criterion.match_boxes(group)[where[1]]
        costs = assigner.costs(group.logits[where[1]], boxes, targets)
        matches = criterion.match(output, self.targets())[where]
        per_image = assigner.image_costs(costs, targets)
        # Repeated targets are interchangeable copies: compare target identities, not indices.
        identity = call.get("target_identity") or [list(range(len(t))) for t in targets]
        return [
            (
                src,
                torch.tensor(identity[i])[tgt] if len(tgt) else tgt,
                per_image[i],
                torch.tensor(identity[i]),
            )
            for i, (src, tgt) in enumerate(matches)
        ]


def inputs_batch(inputs: dict[str, torch.Tensor]) -> ImageBatch:
    """The zero-padded batch of an inputs file's ``image.{i}`` [3, H_i, W_i] with its
    ``batch.mask`` (True on padding) and each image's (h, w)."""
    images = [inputs[k] for k in sorted(k for k in inputs if k.startswith("image."))]
    mask = inputs["batch.mask"].bool()
    pixels = torch.zeros(len(images), 3, *mask.shape[1:])
    for i, image in enumerate(images):
        pixels[i, :, : image.shape[1], : image.shape[2]] = image
    return ImageBatch(pixels, mask, torch.tensor([image.shape[1:] for image in images]))


def shipped_case(name: str) -> Path:
    """The json of a case shipped in ``tests/golden/cases`` (whatever ``DETRKIT_GOLDEN_DIR``
    says): the official cases record the originals' default ``args``."""
    path = SHIPPED_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"shipped golden case {path} is missing")
    return path


def published_config(case: str, flags: dict) -> ExperimentConfig:
    """The config the converter derives from the official defaults a shipped golden case
    records (its ``args``) with a published command's ``flags`` applied."""
    spec = json.loads(shipped_case(case).read_text())
    return source_for_repo(spec["repo"]).config_from_args(dict(spec["args"], **flags))
