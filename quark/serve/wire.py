"""The HTTP connection below the app: the uvicorn settings `quark serve` and `ServerThread` share, and the answer to
a request uvicorn cannot parse.

Choices:
- A request uvicorn's parser refuses (a garbage request line, a negative or non-numeric Content-Length, a
  malformed header) never reaches the app: uvicorn answers it itself, in plain text. `JSONErrorProtocol` (the
  protocol class `http="auto"` would pick, h11 or httptools) answers it with a 400 in the OpenAI error shape,
  like every other error of the server, and closes the connection (the byte stream cannot be resynchronized).
  uvicorn gives only a generic reason ("Invalid HTTP request received."); the parser's own words are not passed on.
- A body that arrives too slowly is the app's to bound (`Limits.body_timeout`, 408): uvicorn has no timeout
  for a request in progress (`timeout_keep_alive` covers only the idle time between requests).
"""

from __future__ import annotations

import json

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .api import APIError


class JSONErrorProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, answering an unparsable request with a JSON 400 rather than plain text."""

    def send_400_response(self, msg: str) -> None:  # called by uvicorn (h11 and httptools alike)
        err = APIError(400, f"malformed HTTP request: {msg} Check the request line and the headers (a "
                       "Content-Length must be a non-negative integer).", code="bad_http_request")
        body = json.dumps(err.body()).encode()
        head = (f"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n")
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def uvicorn_config(app: object, host: str, port: int, log_level: str, **kw: object) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=JSONErrorProtocol, **kw)
