"""The official openai and anthropic Python SDKs against `moeflux serve` with the bundled
model, a tiny chat model trained to add numbers ("12+34=" -> "46"). Greedy decoding
(temperature 0) makes every answer exact.

Prompt token counts follow from the bundled model's character-level tokenizer: the chat
template wraps a user message as "<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n",
one id per character plus the special tokens, i.e. len(msg) + 19 tokens.
"""
import anthropic
import openai
import pytest


def chat_prompt_tokens(msg):
    return len(msg) + 19


# ------------------------------------------------------------------ OpenAI


def test_models_lists_the_served_model(oai, model):
    ids = [m.id for m in oai.models.list()]
    assert ids == [model]
    assert oai.models.retrieve(model).id == model


def test_chat_non_streaming(oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "12+34="}], temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content == "46"
    assert c.finish_reason == "stop"
    assert r.usage.prompt_tokens == chat_prompt_tokens("12+34=")
    assert r.usage.completion_tokens == 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + 2
    assert r.model == model
    assert r.object == "chat.completion"


def test_chat_streaming_with_usage(oai, model):
    stream = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "123+4567="}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert text == "4690"
    assert finish == "stop"
    assert usage.completion_tokens == 4
    assert usage.prompt_tokens == chat_prompt_tokens("123+4567=")


def test_chat_length_limit(oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "123+4567="}], temperature=0, max_tokens=2)
    assert r.choices[0].message.content == "46"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "123+4567="}], temperature=0, max_completion_tokens=1)
    assert r.choices[0].message.content == "4"


def test_chat_stop_string(oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "123+4567="}], temperature=0, stop=["90"])
    assert r.choices[0].message.content == "46"
    assert r.choices[0].finish_reason == "stop"


def test_chat_logprobs(oai, model):
    r = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "12+34="}], temperature=0, logprobs=True, top_logprobs=3
    )
    toks = r.choices[0].logprobs.content
    assert [t.token for t in toks] == ["4", "6"]
    for t in toks:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token  # greedy picks the most likely


def test_chat_seeded_sampling_is_reproducible(oai, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "77+5="}], temperature=1.0, top_p=0.9, seed=1234, max_tokens=6)
    a = oai.chat.completions.create(**kw).choices[0].message.content
    b = oai.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_prefix_reuse_is_reported(oai, model):
    first = [{"role": "user", "content": "21+21="}]
    r1 = oai.chat.completions.create(model=model, messages=first, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "1+2="}]
    r2 = oai.chat.completions.create(model=model, messages=second, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens


def test_completions(oai, model):
    prompt = "<|im_start|>user\n999+1=<|im_end|>\n<|im_start|>assistant\n"
    r = oai.completions.create(model=model, prompt=prompt, temperature=0)
    assert r.choices[0].text == "1000"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == chat_prompt_tokens("999+1=")  # the same text, rendered by hand
    assert r.usage.completion_tokens == 4
    chunks = list(oai.completions.create(model=model, prompt=prompt, temperature=0, stream=True, max_tokens=3))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "100"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_errors(oai, model):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "1+1="}])
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "1+1="}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=[])
    assert e.value.body["param"] == "messages"


def test_wrong_api_key_is_refused(base_url, api_key, model):
    if api_key == "none":
        pytest.skip("server runs without an API key")
    bad = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad = anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "1+1="}])


# ------------------------------------------------------------------ Anthropic

GREEDY = {"temperature": 0}


def test_messages_non_streaming(claude, model):
    m = claude.messages.create(model=model, max_tokens=16, messages=[{"role": "user", "content": "123+4567="}], extra_body=GREEDY)
    assert m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == "4690"
    assert m.stop_reason == "end_turn"
    assert m.stop_sequence is None
    assert m.usage.input_tokens == chat_prompt_tokens("123+4567=")
    assert m.usage.output_tokens == 4
    assert m.model == model


def test_messages_streaming(claude, model):
    with claude.messages.stream(model=model, max_tokens=16, messages=[{"role": "user", "content": "12+34="}], extra_body=GREEDY) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "46"
    assert final.content[0].text == "46"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 2
    assert final.usage.input_tokens == chat_prompt_tokens("12+34=")


def test_messages_raw_event_sequence(claude, model):
    events = list(claude.messages.create(model=model, max_tokens=16, stream=True, messages=[{"role": "user", "content": "5+7="}], extra_body=GREEDY))
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "12"
    delta = events[-2]
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == 2


def test_messages_stop_sequence_and_max_tokens(claude, model):
    m = claude.messages.create(
        model=model, max_tokens=16, stop_sequences=["9"], messages=[{"role": "user", "content": "123+4567="}], extra_body=GREEDY
    )
    assert m.content[0].text == "46"
    assert m.stop_reason == "stop_sequence"
    assert m.stop_sequence == "9"
    m = claude.messages.create(model=model, max_tokens=3, messages=[{"role": "user", "content": "123+4567="}], extra_body=GREEDY)
    assert m.content[0].text == "469"
    assert m.stop_reason == "max_tokens"


def test_messages_system_and_blocks(claude, model):
    m = claude.messages.create(
        model=model,
        max_tokens=8,
        system=[{"type": "text", "text": "You add."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "2+2="}]}],
        extra_body=GREEDY,
    )
    assert m.content[0].type == "text"
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > chat_prompt_tokens("2+2=")


def test_messages_count_tokens(claude, model):
    r = claude.messages.count_tokens(model=model, messages=[{"role": "user", "content": "12+34="}])
    assert r.input_tokens == chat_prompt_tokens("12+34=")


def test_anthropic_errors(claude, model):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "1+1="}], extra_body={"temperature": 3})
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="claude-nonexistent", max_tokens=8, messages=[{"role": "user", "content": "1+1="}])
