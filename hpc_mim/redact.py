"""Secrets out of every text that is logged: credentials in URLs and secret query parameters.

MLflow puts the request URL into its exception texts (``API request to
http://user:password@host:5000/api/2.0/mlflow/runs/log-batch failed with exception ...``), and
those texts reach job logs, status records (jobs/launcher.py), the tracking spool's dead-letter
notes and the report's failure section. ``redact`` turns them into ``http://***@host:5000/...``;
``uri_secret`` says whether a configured URI carries a secret at all (``TrackingConfig.validate``
refuses it: MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or
MLFLOW_TRACKING_TOKEN from the environment instead).

Standard library only: the launcher, the config and the report import it without mlflow.
"""
from __future__ import annotations

import re

# scheme://userinfo@ -- the userinfo runs to the last "@" before the host's end ("/", "?", "#",
# whitespace or a quote), so a raw "@" inside a password is hidden too (RFC 3986 3.2.1).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s'\"<>]*@")
# ?token=... &X-Amz-Signature=... &password=... (presigned artifact URLs, tokens in queries)
_QUERY_SECRET = re.compile(
    r"([?&;][^=&?#\s'\"]*(?:token|secret|passw|pwd|key|sig|credential|auth)[^=&?#\s'\"]*=)[^&#\s'\"]+",
    re.IGNORECASE)
_HEADER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]{8,}")


def redact(text: str) -> str:
    """``text`` with every URL's userinfo, every secret-looking query value and every HTTP
    Authorization value replaced by ``***``. Redact before truncating: a cut in the middle of a
    URL would leave its password without the "@" that marks it."""
    text = _USERINFO.sub(r"\1***@", str(text))
    text = _QUERY_SECRET.sub(r"\1***", text)
    return _HEADER.sub(r"\1 ***", text)


def uri_secret(uri: str) -> str:
    """What secret ``uri`` carries ("" when none): a password in its userinfo (any scheme), any
    userinfo of an http(s) URI (a user name there is a token or half of a login), or a secret
    query parameter. A database URI with a user name alone (``postgresql://mlflow@db/mlflow``,
    the password in ~/.pgpass) carries none."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)@", uri)
    if m and (":" in m.group(2) or m.group(1).lower() in ("http", "https")):
        return "credentials in the URL"
    if _QUERY_SECRET.search(uri):
        return "a secret query parameter"
    return ""
