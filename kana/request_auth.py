"""Reading an API key from a request, in every form Segment and Kana's users send it."""

import base64
import binascii


def api_key_from_authorization(header: str) -> str:
    """The key in an Authorization header, or "" when there is none.

    Accepted: ``Basic base64("<key>:")`` (Segment's libraries and webhooks),
    ``Bearer <key>``, and the bare key (Kana's original webhook set-up).
    """
    header = (header or "").strip()
    if not header:
        return ""
    scheme, _, rest = header.partition(" ")
    scheme_lower = scheme.lower()
    if scheme_lower == "basic" and rest:
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):  # ValueError: non-ASCII text ("Basic é")
            return ""
        username, _, _password = decoded.partition(":")
        return username.strip()
    if scheme_lower == "bearer" and rest:
        return rest.strip()
    if not rest:
        return scheme
    return ""
