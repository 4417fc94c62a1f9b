# SPDX-License-Identifier: Apache-2.0
"""``python -m detrkit``."""

import sys

from detrkit.cli.__main__ import main

sys.exit(main())
