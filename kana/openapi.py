"""What the edges' OpenAPI schemas say about text and free-form JSON.

Both edges (``api`` and ``segment_ingest``) state the same storage rules in their schemas, so
that clients and schemathesis know them: no text may contain NUL (PostgreSQL stores neither
it in text nor in jsonb), and a field that trims its text (Python's ``str.strip()``) and may not
be blank refuses text that is only whitespace. JSON Schema regexes are ECMA-262, whose ``\\s``
is not Python's whitespace: ``PYTHON_SPACE`` lists what ``str.strip()`` removes.
"""

_NO_NUL = r"[^\u0000]"
PYTHON_SPACE = r"\t\n\u000b\u000c\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TEXT_PATTERN = f"^{_NO_NUL}*$"
NOT_BLANK_TEXT_PATTERN = f"^{_NO_NUL}*[^\\u0000{PYTHON_SPACE}]{_NO_NUL}*$"


def padded(pattern: str, *, optional: bool = False) -> str:
    """``pattern`` as a trimming field reads it: surrounding whitespace is removed first."""
    core = f"({pattern})?" if optional else f"({pattern})"
    return f"^[{PYTHON_SPACE}]*{core}[{PYTHON_SPACE}]*$"


# Any JSON value whose text, keys included, has no NUL (what PostgreSQL's jsonb can store).
JSON_VALUE = "JsonValue"
JSON_VALUE_REF = {"$ref": f"#/components/schemas/{JSON_VALUE}"}
JSON_OBJECT = {"type": "object", "propertyNames": {"pattern": TEXT_PATTERN}, "additionalProperties": JSON_VALUE_REF}
COMPONENTS = {
    JSON_VALUE: {
        "description": "Any JSON value; no text in it (keys included) may contain NUL (\\u0000).",
        "anyOf": [
            {"type": "null"},
            {"type": "boolean"},
            {"type": "number"},
            {"type": "string", "pattern": TEXT_PATTERN},
            {"type": "array", "items": JSON_VALUE_REF},
            JSON_OBJECT,
        ],
    }
}
