"""The official `openai` client with a virtual key, through the gateway, against a real vLLM."""
import openai
import pytest

from tests.realvllm.conftest import MODEL

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def oa(real_gateway, calls):
    return openai.OpenAI(base_url=real_gateway.url + "/vllm/v1", api_key=calls.new_key(models=[MODEL]),
                         max_retries=0, timeout=60)


def test_chat(oa):
    reply = oa.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, extra_body={"ignore_eos": True})
    assert reply.model == MODEL and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens > 0


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_stream(oa, include_usage):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(oa.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, stream=True,
                                             extra_body={"ignore_eos": True}, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    else:
        assert all(c.usage is None for c in chunks)


def test_completions(oa):
    reply = oa.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5,
                                  extra_body={"ignore_eos": True})
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 5


def test_models_list(oa):
    assert [m.id for m in oa.models.list()] == [MODEL]


def test_responses_api(oa):
    reply = oa.responses.create(model=MODEL, input="Say something", max_output_tokens=6)
    assert reply.id.startswith("resp") and reply.status in ("completed", "incomplete")
    assert reply.usage.output_tokens > 0


def test_responses_api_stream(oa):
    events = list(oa.responses.create(model=MODEL, input="Say something", max_output_tokens=6, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and "response.completed" in types
    assert events[types.index("response.completed")].response.usage.output_tokens > 0


def test_model_outside_the_key_refused(oa):
    with pytest.raises(openai.PermissionDeniedError):
        oa.chat.completions.create(model="some-other-model", messages=HELLO)
