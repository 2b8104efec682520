"""The official `openai` client against a real gunicorn gateway, as users will run it."""
import openai
import pytest

from tests.conftest import MASTER, MASTER_KEY


def client_for(gateway, key=MASTER_KEY):
    return openai.OpenAI(base_url=gateway.url + "/vllm/v1", api_key=key, max_retries=0)


def test_chat_completion_and_stream(gateway):
    oa = client_for(gateway)
    reply = oa.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content.startswith("tok0") and reply.usage.completion_tokens == 5
    chunks = list(oa.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                             stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 " and chunks[-1].usage.total_tokens == 6
    assert [m.id for m in oa.models.list()] == ["fake-model"]


def test_errors_surface_as_openai_exceptions(gateway):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client_for(gateway).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError, match="Invalid API key"):
        client_for(gateway, "sk-wrong-wrong-wrong-0000").models.list()


def test_virtual_key_with_the_openai_client(gateway):
    import requests
    created = requests.post(gateway.url + "/key/generate", headers=MASTER, json={"models": ["fake-model"]}).json()
    oa = client_for(gateway, created["key"])
    assert oa.completions.create(model="fake-model", prompt="hello").choices[0].text
    with pytest.raises(openai.PermissionDeniedError):
        oa.completions.create(model="other", prompt="hello")
