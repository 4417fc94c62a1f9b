# SPDX-License-Identifier: Apache-2.0
"""Writing detrkit models for other runtimes: ONNX (``onnx.py``) and Hugging Face transformers
(``transformers.py``)."""
