# SPDX-License-Identifier: Apache-2.0
"""Dense (anchor- and proposal-based) heads on multi-scale maps: the training-only auxiliary
heads of Co-DETR (RPN, RoI head) and their building blocks, with mmdetection-2 semantics."""
