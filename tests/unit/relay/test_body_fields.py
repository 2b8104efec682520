"""gateway/relay/bodyfields.py `body_fields`: JSON top-level fields, and multipart text fields
read as vLLM (Starlette + python-multipart) reads them, or refused."""
import pytest

from gateway.core.errors import GatewayError
from gateway.keys.policy import check_model
from gateway.relay.bodyfields import body_fields


def multipart(*fields: tuple[str, str], boundary: str = "B0undary") -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields]
    body = ("".join(parts) + f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


def form(*parts, boundary="B"):
    out = b""
    for disposition, value in parts:
        out += b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


def test_utf7_form_hiding_a_second_model_is_refused():
    body = form((b'name="model"', b"allowed"), (b'name="mo+AGQ-el"', b"forbidden"))
    fields = body_fields(body, "multipart/form-data; boundary=B; charset=utf-7")
    assert fields is None
    with pytest.raises(GatewayError) as err:
        check_model(fields, {"models": ["allowed"]}, has_body=True)
    assert err.value.status == 403


@pytest.mark.parametrize("charset", ["utf-8", "UTF8", "us-ascii", '"utf-8"'])
def test_plain_charsets_are_read(charset):
    body = form((b'name="model"', b"m"))
    assert body_fields(body, f"multipart/form-data; boundary=B; charset={charset}") == {"model": "m"}


@pytest.mark.parametrize("charset", ["utf-7", "utf-16", "latin-1", "no-such-charset"])
def test_other_charsets_are_refused(charset):
    assert body_fields(form((b'name="model"', b"m")), f"multipart/form-data; boundary=B; charset={charset}") is None


def test_a_model_sent_as_text_and_as_a_file_is_ambiguous():
    body = form((b'name="model"', b"allowed"), (b'name="model"; filename="m.txt"', b"forbidden"))
    assert body_fields(body, "multipart/form-data; boundary=B") == {"model": ["allowed", None]}


def test_a_part_without_a_name_refuses_the_form_as_starlette_does():
    assert body_fields(form((b'filename="x"', b"data"), (b'name="model"', b"m")), "multipart/form-data; boundary=B") is None


def test_a_text_part_over_starlettes_limit_refuses_the_form():
    body = form((b'name="model"', b"m"), (b'name="prompt"', b"x" * (1024 * 1024 + 1)))
    assert body_fields(body, "multipart/form-data; boundary=B") is None


def test_file_contents_are_not_kept(monkeypatch):
    """A 20 MiB upload is parsed without its contents being kept anywhere."""
    import tracemalloc

    body = form((b'name="file"; filename="a.wav"', b"\0" * (20 * 2**20)), (b'name="model"', b"whisper"))
    tracemalloc.start()
    try:
        fields = body_fields(body, "multipart/form-data; boundary=B")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fields == {"model": "whisper"}
    assert peak < 2 * 2**20


# --- body_fields -------------------------------------------------------------------------------

def test_body_fields_of_a_json_object_are_its_top_level_fields():
    assert body_fields(b'{"model": "m", "messages": [{"role": "user"}]}', "application/json") == {
        "model": "m", "messages": [{"role": "user"}]}


def test_body_fields_read_json_whatever_the_content_type():
    assert body_fields(b'{"model": "m"}', None) == {"model": "m"}
    assert body_fields(b'{"model": "m"}', "text/plain") == {"model": "m"}


def test_body_fields_duplicate_json_key_takes_the_last_value_as_vllm_does():
    assert body_fields(b'{"model": "allowed", "model": "other"}', "application/json") == {"model": "other"}


@pytest.mark.parametrize("body", [b'["model"]', b'"model"', b"42", b"null", b"true"])
def test_body_fields_of_a_json_non_object_is_none(body):
    assert body_fields(body, "application/json") is None


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"model": "m",}', b"\xff\xfe\x00"])
def test_body_fields_of_invalid_json_is_none(body):
    assert body_fields(body, "application/json") is None


@pytest.mark.parametrize("body", [b"[" * 200_000, b'{"a":' * 200_000])
def test_body_fields_of_absurdly_deep_json_is_none_not_a_crash(body):
    assert body_fields(body, "application/json") is None


def test_body_fields_of_multipart_are_its_text_fields():
    body, ctype = multipart(("model", "whisper"), ("language", "en"))
    assert body_fields(body, ctype) == {"model": "whisper", "language": "en"}


def test_body_fields_multipart_leaves_out_file_parts():
    body = (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--B--\r\n")
    assert body_fields(body, "multipart/form-data; boundary=B") == {"model": "whisper"}


def test_body_fields_multipart_field_sent_twice_with_different_values_is_a_list():
    body, ctype = multipart(("model", "allowed"), ("model", "forbidden"))
    assert body_fields(body, ctype) == {"model": ["allowed", "forbidden"]}


def test_body_fields_multipart_field_sent_twice_with_the_same_value_is_that_value():
    body, ctype = multipart(("model", "m"), ("model", "m"))
    assert body_fields(body, ctype) == {"model": "m"}


@pytest.mark.parametrize("body, ctype", [
    (b"garbage", "multipart/form-data; boundary=B"),
    (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--B--\r\n', "multipart/form-data"),
])
def test_body_fields_of_malformed_multipart_is_none(body, ctype):
    assert body_fields(body, ctype) is None
