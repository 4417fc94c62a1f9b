# SPDX-License-Identifier: Apache-2.0
"""detrkit models out to Hugging Face transformers (docs/transformers.md).

``export_transformers`` writes a ``save_pretrained`` folder that
``DetrForObjectDetection.from_pretrained`` / ``DeformableDetrForObjectDetection.from_pretrained``
loads with no missing or unexpected key and that predicts what detrkit predicts: the backbone in
transformers' own ResNet layout (no timm, no hub), ``id2label`` from the label map, and
``tie_word_embeddings=False`` for per-layer heads. transformers is an optional dependency
(``pip install 'detrkit[hf]'``), imported only here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detrkit.convert.transformers_config import DETR
from detrkit.convert.transformers_keys import hf_keys
from detrkit.errors import UserError
from detrkit.export.transformers_config import ExportPlan, export_plan
from detrkit.inference import LoadedModel

MIN_MAJOR = 5
_CLASSES = {
    DETR: ("DetrConfig", "DetrForObjectDetection"),
    "deformable_detr": ("DeformableDetrConfig", "DeformableDetrForObjectDetection"),
}


@dataclass
class TransformersExport:
    """What was written.

    Attributes:
        out: the folder (``config.json`` + ``model.safetensors``).
        architecture: the transformers class that loads it.
        tensors: tensors in the transformers state dict.
        notes: training-only settings transformers lacks, dropped.
    """

    out: Path
    architecture: str
    tensors: int
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.architecture} folder with {self.tensors} tensors"
        return f"{text}; {'; '.join(self.notes)}" if self.notes else text


def require_transformers():
    """The ``transformers`` module, or a UserError saying how to install it."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise UserError(
            "exporting to transformers needs the transformers package: pip install 'detrkit[hf]'"
        ) from None
    # transformers 4 names the weights differently (out_proj, fc1, backbone.conv_encoder).
    if int(transformers.__version__.split(".")[0]) < MIN_MAJOR:
        raise UserError(
            f"exporting to transformers needs transformers>={MIN_MAJOR}, found "
            f"{transformers.__version__}: pip install -U 'transformers>={MIN_MAJOR}'"
        )
    return transformers


def transformers_state_dict(loaded: LoadedModel, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """Every detrkit tensor under each of its transformers names (heads transformers keeps twice
    are written twice); ``num_batches_tracked`` counters have no transformers counterpart."""
    state = {}
    for key, value in loaded.model.state_dict().items():
        try:
            names = hf_keys(key, plan.model, plan.shared)
        except KeyError:
            raise UserError(
                f"cannot export to transformers: {key} has no transformers counterpart"
            ) from None
        for name in names:
            state[name] = value.detach().cpu().clone()
    return state


def export_transformers(loaded: LoadedModel, out: Path) -> TransformersExport:
    """Write ``loaded`` as a transformers folder at ``out``.

    Raises:
        UserError: transformers is not installed, or the model is one transformers does not have.
    """
    plan = export_plan(loaded.config.model, loaded.label_map)
    transformers = require_transformers()
    config_name, model_name = _CLASSES[plan.model.family]
    values = dict(plan.config)
    values["backbone_config"] = transformers.ResNetConfig(**values["backbone_config"])
    try:
        hf_config = getattr(transformers, config_name)(**values)
    except Exception as error:  # transformers' strict configs raise their own error types
        message = " ".join(str(error).split())
        raise UserError(f"cannot export to transformers: its config refused {message}") from None
    model = getattr(transformers, model_name)(hf_config).eval()
    state = transformers_state_dict(loaded, plan)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(
            f"cannot export to transformers: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return TransformersExport(out, model_name, len(state), plan.notes)
