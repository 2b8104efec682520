"""Multipart text fields read as vLLM (Starlette + python-multipart) reads them, or refused."""
import pytest

from gateway.core.errors import GatewayError
from gateway.keys.policy import body_fields, check_model


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
