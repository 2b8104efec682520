"""What a virtual key may do on /vllm: which vLLM routes, which models.

The master key skips all of this. Route checks work on the decoded, slash-collapsed path,
so `/v1/load%5Flora_adapter` or `//sleep` cannot slip past a rule.
"""
from __future__ import annotations

import re
from urllib.parse import unquote

from gateway.core.errors import GatewayError
from gateway.relay.bodyfields import top_level_fields

# What a virtual key may call, the rule written down (README, "What a virtual key may call"):
#   1. every route under a prefix that vLLM's own `--api-key` guards (`/v1/`, `/v2/`,
#      `/inference/`): vLLM itself treats these as its client API;
#   2. vLLM's inference routes outside those prefixes, named one by one;
#   3. its read-only status routes.
# Anything else is refused until it is added here deliberately: a new vLLM route is more often
# an operator tool than an inference endpoint. Checked against vLLM 0.32 (reference.md §2, §6).
DEFAULT_ALLOWED = ("/v1/", "/v2/", "/inference/",
                   "/tokenize", "/detokenize", "/pooling", "/classify", "/score", "/rerank",
                   "/invocations", "/generative_scoring",
                   "/health", "/ping", "/version", "/load", "/metrics")
# Operator routes: never for a virtual key, even inside /v1 or when allowed_routes names them.
OPERATOR_ROUTES = ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_", "/server_info",
                   "/start_profile", "/stop_profile", "/pause", "/resume", "/is_paused",
                   "/update_weights", "/scale_elastic_ep", "/v1/load_lora_adapter",
                   "/v1/unload_lora_adapter", "/release_kv_cache_memory", "/fault_tolerance")


def policy_path(path: str) -> str:
    """vLLM's path decoded, repeated slashes collapsed, lower-cased."""
    for _ in range(3):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = re.sub(r"/{2,}", "/", path.replace("\\", "/")).lower()
    return path or "/"


def _matches(path: str, rule: str) -> bool:
    """A rule is an exact path, a prefix ending in '/', or a prefix ending in '*'."""
    rule = rule.lower()
    if rule.endswith("*"):
        return path.startswith(rule[:-1])
    if rule.endswith("/"):
        return path.startswith(rule)
    return path == rule or path.startswith(rule + "/")


def check_route(path: str, key: dict) -> None:
    """403 unless the key may call this vLLM path."""
    if any(path.startswith(r) for r in OPERATOR_ROUTES):
        raise GatewayError(403, f"virtual keys may not call vLLM's operator route {path}", "permission_error")
    if not any(_matches(path, r) for r in DEFAULT_ALLOWED):
        raise GatewayError(403, f"virtual keys may not call {path}", "permission_error")
    allowed = [r[5:] if r.lower().startswith("/vllm/") else r for r in key.get("allowed_routes") or []]
    if allowed and not any(_matches(path, r) for r in allowed):
        raise GatewayError(403, f"this key's allowed_routes do not include {path}", "permission_error")


def body_fields(body: bytes, content_type: str | None) -> dict | None:
    """The top-level fields of a JSON object body or the text fields of a multipart form;
    None when the body is neither (or unreadable). Large JSON bodies give a `LeanFields`."""
    ctype = (content_type or "").lower()
    if ctype.startswith("multipart/form-data"):
        return _form_fields(body, content_type)
    return top_level_fields(body)


# Starlette's limit for one text part: vLLM refuses a form with a longer one.
_MAX_TEXT_PART = 1024 * 1024
# Form charsets read the same by every parser; any other is refused rather than guessed at
# (with `charset=utf-7`, a part named `mo+AGQ-el` is "model" to Starlette, "mo+AGQ-el" to others).
_PLAIN_CHARSETS = ("utf-8", "ascii")
_FILE = object()  # a file part: never a text field's value


def _form_fields(body: bytes, content_type: str) -> dict | None:
    """The text fields of a multipart form, read as vLLM reads them: python-multipart's parser
    with Starlette's rules (a part with a filename is a file; names and values decoded with the
    form's charset, latin-1 when that fails). File contents are dropped as they are parsed.

    A field sent twice with different values (or as a text and a file) is ambiguous: vLLM takes
    the last, a naive reader the first. It is kept as a list, so a check that wants one string
    refuses it."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    charset = _form_charset(params.get(b"charset", b"utf-8"))
    boundary = params.get(b"boundary")
    if charset is None or not boundary:
        return None
    form = _FormReader(charset)
    try:
        parser = MultipartParser(boundary, form.callbacks())
        parser.write(body)
        parser.finalize()
    except Exception:  # python-multipart raises several types for malformed multipart
        return None
    if form.too_large:
        return None
    fields = {}
    for name, values in form.values.items():
        texts = [value for value in values if value is not _FILE]
        if not texts:
            continue  # only file parts: not a text field
        if _FILE in values or len(set(texts)) > 1:
            fields[name] = [None if value is _FILE else value for value in values]
        else:
            fields[name] = texts[0]
    return fields


def _form_charset(raw: bytes) -> str | None:
    """The codec name of a form's charset parameter when it is a plain one, else None."""
    import codecs

    try:
        name = codecs.lookup(raw.decode("latin-1")).name
    except LookupError:
        return None
    return name if name in _PLAIN_CHARSETS else None


class _FormReader:
    """python-multipart callbacks keeping each part's name and, for text parts, its value."""

    def __init__(self, charset: str):
        self.charset = charset
        self.values: dict[str, list] = {}
        self.too_large = False
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._data = bytearray()
        self._is_file = False
        self._name = ""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_part_data": self._part_data,
                "on_part_end": self._part_end, "on_header_field": self._header_field,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished}

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except UnicodeDecodeError:
            return raw.decode("latin-1")  # Starlette's fallback

    def _part_begin(self) -> None:
        self._disposition, self._data, self._is_file = b"", bytearray(), False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value  # Starlette: the last one counts
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ValueError("a form part without a name")  # Starlette refuses the form
        self._name = self._decode(options[b"name"])
        self._is_file = b"filename" in options

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            return  # file contents are never a field: not kept
        if len(self._data) + end - start > _MAX_TEXT_PART:
            self.too_large = True
            return
        self._data += data[start:end]

    def _part_end(self) -> None:
        value = _FILE if self._is_file else self._decode(bytes(self._data))
        self.values.setdefault(self._name, []).append(value)


def check_model(fields: dict | None, key: dict, has_body: bool) -> None:
    """With a model allow-list, the body's model must be on it; unreadable means refused."""
    models = key.get("models") or []
    if not models or not has_body:
        return
    model = fields.get("model") if fields is not None else None
    if not isinstance(model, str):
        raise GatewayError(403, "this key is limited to certain models and the request's model could "
                                "not be read from its body", "key_model_access_denied", param="model")
    if model not in models:
        raise GatewayError(403, f"this key may not use model {model!r}", "key_model_access_denied", param="model")
