# SPDX-License-Identifier: Apache-2.0
"""The one exception type for mistakes a user can fix (bad paths, config keys, annotations)."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints the message alone, without a traceback.

    The message names the file (and annotation id, key, ...) at fault and what to do about it.
    """
