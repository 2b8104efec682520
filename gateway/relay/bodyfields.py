"""The top-level fields of a request body (JSON, or a multipart form), as vLLM would read them.

Admission needs only a few top-level fields: `model` (the key's model list), `user` (the end
user), `previous_response_id` (replica stickiness) and, for the usage estimate, how much prompt
text there is. `json.loads` of a 60 MiB `{"a":[{},{},...],"model":"m"}` took ~1.5 GB and 4 s to
answer that. Small bodies still go through `json.loads` (fast, and what vLLM's FastAPI does);
larger ones are decoded by msgspec into a struct of `msgspec.Raw` slices: its C decoder skips
every other field without building it, and a Raw is a view of the body, not a copy
(60 MiB of `{},` in ~0.12 s, no memory beyond the body).

The answer is the one `json.loads` gives wherever vLLM would accept the body: duplicate keys,
the last wins; escaped key names (`"mod\\u0065l"`) are decoded; invalid JSON or trailing garbage
give None. Where msgspec is stricter it gives None, which the model check refuses: NaN/Infinity,
a lone surrogate escape, a UTF-8 BOM, UTF-16/32 bodies. It does not check the UTF-8 of strings it
skips; vLLM refuses such a body whole, so nothing reaches a model.

Multipart forms are read with python-multipart under Starlette's rules (what vLLM parses with).

`prompt_head` gives the start of a request's prompt as it appears in the body, for prefix
affinity (gateway/relay/choice.py): for a large body from the parse above (no second parse).
"""
from __future__ import annotations

import json
import re

import msgspec

# Up to here json.loads is used: its worst case (a body of `{},{},...`) stays within ~30 MB.
SMALL_BODY = 1 << 20
# The prompt fields are counted exactly while they hold at most this many elements (array
# items plus message content parts, bounded by their commas): one small Raw object each, a few
# MB at most. Past it the prompt is sized by its bytes, which never under-counts.
MAX_COUNTED_ELEMENTS = 50_000
# The top-level scalars admission reads.
SCALARS = ("model", "user", "previous_response_id",
           "max_tokens", "max_completion_tokens", "max_output_tokens", "n")  # the budget estimate
# Matches when an array holds at least MAX_COUNTED_ELEMENTS commas, without copying it.
_TOO_MANY_ELEMENTS = re.compile(rb"(?:[^,]*,){%d}" % MAX_COUNTED_ELEMENTS)


class _Body(msgspec.Struct):
    """The top-level fields admission reads; msgspec skips all others."""
    model: msgspec.Raw = msgspec.UNSET
    user: msgspec.Raw = msgspec.UNSET
    previous_response_id: msgspec.Raw = msgspec.UNSET
    max_tokens: msgspec.Raw = msgspec.UNSET
    max_completion_tokens: msgspec.Raw = msgspec.UNSET
    max_output_tokens: msgspec.Raw = msgspec.UNSET
    n: msgspec.Raw = msgspec.UNSET
    prompt: msgspec.Raw = msgspec.UNSET
    input: msgspec.Raw = msgspec.UNSET
    messages: msgspec.Raw = msgspec.UNSET


class _Message(msgspec.Struct):
    content: msgspec.Raw = msgspec.UNSET


class _Prompt(msgspec.Struct):
    """Where a prompt can be: chat `messages`, completions `prompt`, Responses `input`."""
    messages: msgspec.Raw = msgspec.UNSET
    prompt: msgspec.Raw = msgspec.UNSET
    input: msgspec.Raw = msgspec.UNSET


class _Role(msgspec.Struct):
    role: msgspec.Raw = msgspec.UNSET


class _Part(msgspec.Struct):
    text: msgspec.Raw = msgspec.UNSET


_decode_body = msgspec.json.Decoder(_Body).decode
_decode_message = msgspec.json.Decoder(_Message).decode
_decode_part = msgspec.json.Decoder(_Part).decode
_decode_list = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_prompt = msgspec.json.Decoder(_Prompt).decode
_decode_role = msgspec.json.Decoder(_Role).decode


class LeanFields(dict):
    """The `SCALARS` of a large body, and what the usage estimate needs in place of the prompt:
    `prompt_chars`, the characters `estimate_prompt_tokens` would count in `prompt`/`input` and
    in the messages' text, and `message_count`, the number of messages it adds overhead for."""

    def __init__(self):
        super().__init__()
        self.prompt_chars = 0
        self.message_count = 0
        self.prompt_source = None  # (Raw, its first elements or None) for prompt_head


def top_level_fields(body: bytes) -> dict | None:
    """The body's top-level fields when it is a JSON object, else None.

    A small body gives every field (`json.loads`); a large one a `LeanFields`."""
    if len(body) <= SMALL_BODY:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            return None
        return payload if isinstance(payload, dict) else None
    try:
        parsed = _decode_body(body)
        fields = LeanFields()
        for name in SCALARS:
            raw = getattr(parsed, name)
            if raw is not msgspec.UNSET:
                fields[name] = _scalar(raw)
        prompt = parsed.prompt if parsed.prompt is not msgspec.UNSET else parsed.input
        prompt_items = _elements(prompt) if _first(prompt) == b"[" else None
        fields.prompt_chars = _text_chars(prompt, items=prompt_items)
        fields.message_count, message_chars, message_items = _messages(parsed.messages)
        fields.prompt_chars += message_chars
        if parsed.messages is not msgspec.UNSET:
            fields.prompt_source = (parsed.messages, message_items)
        elif prompt is not msgspec.UNSET:
            fields.prompt_source = (prompt, prompt_items)
    # DecodeError includes ValidationError: a body that is not an object.
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return fields


def _first(raw) -> bytes:
    """The first byte of a Raw value: which kind of JSON value it is (b"" when unset)."""
    return b"" if raw is msgspec.UNSET else bytes(memoryview(raw)[:1])


def _size(raw) -> int:
    return memoryview(raw).nbytes


def _scalar(raw: msgspec.Raw):
    """A JSON scalar's value; None for a container (never built: for admission a container
    where a string belongs is as unreadable as null)."""
    if _first(raw) in (b"{", b"["):
        return None
    return msgspec.json.decode(raw)


def _string_length(raw) -> int:
    """The characters of a JSON string; 0 for any other value."""
    if _first(raw) != b'"':
        return 0
    return len(msgspec.json.decode(raw, type=str))


def _elements(raw) -> list | None:
    """The elements (as Raw) of a JSON array small enough to count; None for anything else."""
    if _first(raw) != b"[" or _TOO_MANY_ELEMENTS.match(memoryview(raw)):
        return None
    return _decode_list(raw)


_NOT_GIVEN = object()


def _text_chars(raw, part_text=None, items=_NOT_GIVEN) -> int:
    """A string's length, or the lengths of an array's strings (taken through `part_text` from
    each object element when given); an array too long to count costs its bytes. `items`: the
    array's elements when the caller decoded them already."""
    if _first(raw) != b"[":
        return _string_length(raw)
    if items is _NOT_GIVEN:
        items = _elements(raw)
    if items is None:
        return _size(raw)
    if part_text is not None:
        items = (part_text(item) for item in items if _first(item) == b"{")
    return sum(_string_length(item) for item in items)


def _messages(raw) -> tuple[int, int, list | None]:
    """The number of messages, the characters of their text content, and the messages (as Raw;
    None when there are too many to count)."""
    if _first(raw) != b"[":
        return 0, 0, None
    items = _elements(raw)
    if items is None:
        # Too many to count one by one: every message is at least `{}`, and its text at most
        # its bytes.
        return 0, _size(raw), None
    chars = 0
    for item in items:
        if _first(item) == b"{":
            chars += _content_chars(_decode_message(item).content)
    return len(items), chars, items


def _content_chars(raw) -> int:
    """A message's `content`: a string's length, or the lengths of its parts' `text`."""
    return _text_chars(raw, lambda part: _decode_part(part).text)


# -- the start of the prompt, for prefix affinity ----------------------------------------------

# A conversation's turns repeat its first messages; these are looked at for the first user one.
HEAD_MESSAGES = 8


def prompt_head(body: bytes, fields: dict | None, limit: int) -> bytes | None:
    """The start of the request's prompt as it appears in the body, stable across the turns of
    one conversation, or None when the body has none (not JSON, no prompt).

    The prompt is `messages`, else `prompt`, else `input`. An array of objects (chat messages,
    Responses input items) gives its messages up to and including the first with role "user"
    (looked for among the first HEAD_MESSAGES; none found: the first message alone), each cut
    to `limit` bytes: a later turn appends to the conversation, so this part stays the same,
    while two conversations that share only a system prompt differ in their first user
    message. Anything else (a string, token ids, a list of prompts) gives its first `limit`
    bytes. A large body's prompt comes from its one parse (LeanFields.prompt_source); a small
    one is decoded here with msgspec, which skips every other field."""
    if not fields:
        return None
    if isinstance(fields, LeanFields):
        if fields.prompt_source is None:
            return None
        raw, items = fields.prompt_source
    else:
        if not any(name in fields for name in ("messages", "prompt", "input")):
            return None
        try:
            parsed = _decode_prompt(body)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return None
        raw = next((r for r in (parsed.messages, parsed.prompt, parsed.input) if r is not msgspec.UNSET), None)
        if raw is None:
            return None
        items = _elements(raw) if _first(raw) == b"[" else None
    if items and _first(items[0]) == b"{":
        head = []
        for item in items[:HEAD_MESSAGES]:
            head.append(bytes(memoryview(item)[:limit]))
            if _is_user(item):
                break
        else:
            head = head[:1]
        return b"\0".join(head)
    return bytes(memoryview(raw)[:limit]) or None


def _is_user(item) -> bool:
    try:
        role = _decode_role(item).role
    except (msgspec.DecodeError, UnicodeDecodeError):
        return False
    return role is not msgspec.UNSET and bytes(role) == b'"user"'


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


# -- the one sanctioned body rewrite: a key's model alias (gateway/keys/policy.py aliased_model) --
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_STRUCTURAL = re.compile(rb'["{}\[\],]')  # jumps over numbers, literals and spaces at C speed


def rewrite_model(body: bytes, model: str) -> bytes | None:
    """`body` with the value of every top-level `"model"` member replaced by `model` (JSON-quoted)
    and every other byte kept; None when it is not a JSON object with a string `model` there.
    Only the member's value bytes change: no re-encoding, so the rest stays as the caller sent it
    (and vLLM, which keeps the last duplicate, still reads the new name). Content-Length is
    recomputed by the transport from the new bytes. Past SMALL_BODY the byte scan (a Python step
    per bracket: 8 s for 15 MB of `{},`) would stall the worker, so the object is rebuilt from
    msgspec's raw member values instead: every value's bytes kept, whitespace between top-level
    members and duplicate members dropped."""
    value = json.dumps(model).encode()
    if len(body) > SMALL_BODY:
        return _rebuilt_with_model(body, value)
    spans = _model_value_spans(body)
    if not spans:
        return None
    out, last = [], 0
    for start, end in spans:
        out += [body[last:start], value]
        last = end
    out.append(body[last:])
    return b"".join(out)


def _model_value_spans(body: bytes) -> list:
    """(start, end) of each top-level member value named "model" that is a JSON string."""
    i, depth, spans, n = 0, 0, [], len(body)
    expect_key = False
    while i < n:
        found = _STRUCTURAL.search(body, i)
        if found is None:
            break
        i = found.start()
        c = body[i:i + 1]
        if c == b'"':
            match = _STRING.match(body, i)
            if match is None:
                return []
            end = match.end()
            if depth == 1 and expect_key and _is_model_key(match.group()):
                j = end
                while j < n and body[j:j + 1] in (b" ", b"\t", b"\r", b"\n", b":"):
                    j += 1
                value = _STRING.match(body, j) if body[j:j + 1] == b'"' else None
                if value is None:
                    return []  # a model that is not a string: leave the body alone
                spans.append((j, value.end()))
                end = value.end()
            expect_key = False
            i = end
            continue
        if c in (b"{", b"["):
            depth += 1
            expect_key = c == b"{" and depth == 1
        elif c in (b"}", b"]"):
            depth -= 1
        elif c == b"," and depth == 1:
            expect_key = True
        i += 1
    return spans


def _is_model_key(quoted: bytes) -> bool:
    """A member name spelling "model", escapes included ("mod\\u0065l"), as json.loads reads it."""
    if quoted == b'"model"':
        return True
    try:
        return json.loads(quoted) == "model"
    except ValueError:
        return False


def _rebuilt_with_model(body: bytes, value: bytes) -> bytes | None:
    """A large JSON object rebuilt member by member from raw value slices, `model` replaced."""
    try:
        members = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not bytes(members.get("model", b""))[:1] == b'"':
        return None
    parts = [json.dumps(name).encode() + b":" + (value if name == "model" else bytes(raw))
             for name, raw in members.items()]
    return b"{" + b",".join(parts) + b"}"
