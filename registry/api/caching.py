"""HTTP caching of content-addressed responses: `ETag` is the digest.

Content fetched by digest never changes: it is `immutable` for a year.
Content fetched by tag may change when the tag moves: clients revalidate
(`no-cache`) and get 304 while the digest is the same. `private`, since
responses may depend on the caller's grants.
"""

from __future__ import annotations

from starlette.requests import Request

IMMUTABLE = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"


def content_cache_headers(digest: str, *, immutable: bool) -> dict[str, str]:
    return {"ETag": f'"{digest}"', "Cache-Control": IMMUTABLE if immutable else REVALIDATE}


def not_modified(request: Request, digest: str) -> bool:
    """Whether the request's `If-None-Match` names this digest (or `*`)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    candidates = {item.strip().removeprefix("W/") for item in header.split(",")}
    return "*" in candidates or f'"{digest}"' in candidates
