"""The users CSV format shared by export and import: columns and spreadsheet-safe cells.

Formula injection: a spreadsheet runs a cell starting with ``=``, ``+``, ``-``, ``@``, tab or
carriage return as a formula. The export puts a ``'`` in front of such a cell (spreadsheets
show it as text and hide the quote); the import takes exactly that quote off again. To keep
the round trip lossless a value that itself starts with quotes followed by one of those
characters (``'=x``) gets one more quote too, so the rule is a bijection:

    export: ``'`` + value   when value matches  ^'*[=+\\-@\\t\\r]
    import: value[1:]       when value matches  ^'+[=+\\-@\\t\\r]

Any other value, including ``'Tis`` typed by hand, passes through unchanged both ways.
"""

import re

COLUMNS = ("kana_id", "user_id", "name", "email", "billing_id", "billing_provider", "created_at", "flags")
# The columns an import reads; the others are there so an export can be re-imported as is.
READ_COLUMNS = ("kana_id", "user_id", "name", "email", "billing_id")
# What the flags cell joins the user's flags with (e.g. "no_billing_id;same_email").
FLAG_SEPARATOR = ";"

FORMULA_TRIGGERS = frozenset("=+-@\t\r'")
_NEEDS_QUOTE = re.compile(r"'*[=+\-@\t\r]")
_QUOTED = re.compile(r"'+[=+\-@\t\r]")


def escape_cell(value: str) -> str:
    """A text cell as exported: neutralised for spreadsheets, reversible by ``unescape_cell``."""
    if value and value[0] in FORMULA_TRIGGERS and _NEEDS_QUOTE.match(value):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """A text cell as imported: the quote ``escape_cell`` added is taken off."""
    if value.startswith("'") and _QUOTED.match(value):
        return value[1:]
    return value
