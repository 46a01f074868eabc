"""The errno reference page, shipped with the package: served as HTML at /errors, so that the
`info` links' `#errno-N` anchors work in a browser, and as markdown at /errors.md.

errors.md uses a small subset of markdown (headings, paragraphs, `code`, `<a id>` anchors);
it is converted here once, at import, without a markdown library.
"""

from __future__ import annotations

import html
import re
from importlib.resources import files

ERRORS_MARKDOWN: bytes = files("msgrelay.web").joinpath("errors.md").read_bytes()

_ANCHOR = re.compile(r'^<a id="([A-Za-z0-9_-]+)"></a>$')
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))


def markdown_to_html(markdown: str) -> str:
    """Headings (with the preceding anchor as their id), paragraphs and inline code."""
    body: list[str] = []
    paragraph: list[str] = []
    anchor = ""

    def flush() -> None:
        if paragraph:
            body.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    for line in markdown.splitlines():
        stripped = line.strip()
        match = _ANCHOR.match(stripped)
        if match:
            flush()
            anchor = match.group(1)
        elif stripped.startswith("#"):
            flush()
            level = min(len(stripped) - len(stripped.lstrip("#")), 6)
            ident = f' id="{anchor}"' if anchor else ""
            body.append(f"<h{level}{ident}>{_inline(stripped[level:].strip())}</h{level}>")
            anchor = ""
        elif not stripped:
            flush()
        else:
            paragraph.append(stripped)
    flush()
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>msgrelay errno reference</title>"
            "<style>body{font-family:sans-serif;max-width:46em;margin:2em auto;padding:0 1em;line-height:1.45}"
            "code{background:#f2f2f2;padding:0 .2em}h2:target{background:#fff3b0}</style></head><body>\n"
            + "\n".join(body) + "\n<p>(<a href=\"errors.md\">markdown</a>)</p></body></html>\n")


ERRORS_PAGE: bytes = markdown_to_html(ERRORS_MARKDOWN.decode("utf-8")).encode("utf-8")
