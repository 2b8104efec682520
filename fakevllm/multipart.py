"""Minimal multipart/form-data parser for the fake transcription routes.

The stdlib ``cgi`` module is deprecated (and gone in 3.13), so this is a
small hand parser.  Header parameters (``boundary``, ``name``,
``filename``) are decoded with ``email.message.Message`` because quoting
rules for those parameters are fiddly and the email package already gets
them right.
"""

from email.message import Message
from email.parser import BytesHeaderParser

__all__ = ["MultipartError", "parse_form"]

_header_parser = BytesHeaderParser()


class MultipartError(ValueError):
    """Raised for a missing boundary or a malformed body."""


def _boundary(content_type):
    msg = Message()
    msg["content-type"] = content_type or ""
    if msg.get_content_type() != "multipart/form-data":
        raise MultipartError("Content-Type must be multipart/form-data")
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise MultipartError("Missing boundary in multipart/form-data Content-Type")
    return boundary.encode("latin-1")


def parse_form(body, content_type):
    """Parse ``body`` into ``{name: (filename_or_None, bytes)}``.

    Only what a form post needs: each part must carry a
    ``Content-Disposition: form-data; name=...`` header.  Repeated names
    keep the last value (enough for audio endpoints).
    """
    delim = b"\r\n--" + _boundary(content_type)
    # Prepending CRLF lets the first delimiter (which may start the body)
    # match the same pattern as all the others; the part before it is the
    # preamble, which RFC 2046 says to ignore.
    segments = (b"\r\n" + body).split(delim)
    if len(segments) < 2:
        raise MultipartError("multipart body has no boundary delimiter")
    fields = {}
    closed = False
    for seg in segments[1:]:
        if seg.startswith(b"--"):
            closed = True  # close-delimiter; anything after is epilogue
            break
        # Transport padding (spaces/tabs) may precede the CRLF.
        line_end = seg.find(b"\r\n")
        if line_end < 0 or seg[:line_end].strip(b" \t"):
            raise MultipartError("malformed multipart delimiter line")
        head, sep, content = seg[line_end + 2:].partition(b"\r\n\r\n")
        if not sep:
            # A part with no headers at all starts with the blank line.
            if seg[line_end + 2:line_end + 4] == b"\r\n":
                head, content = b"", seg[line_end + 4:]
            else:
                raise MultipartError("multipart part has no header terminator")
        headers = _header_parser.parsebytes(head + b"\r\n\r\n")
        if headers.get_content_disposition() != "form-data":
            raise MultipartError("multipart part lacks Content-Disposition: form-data")
        name = headers.get_param("name", header="content-disposition")
        if not name or not isinstance(name, str):
            raise MultipartError("multipart part has no name")
        fields[name] = (headers.get_filename(), content)
    if not closed:
        raise MultipartError("multipart body is truncated (no close delimiter)")
    return fields
