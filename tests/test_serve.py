"""``dual-lm serve``: one server for the module, driven by the official ``openai`` client and by raw
HTTP, checked against ``dual-lm generate`` and ``dual-lm fill`` run in-process; then the request
checks and the streamed text as pure functions, and the command's refusals."""

from __future__ import annotations

import http.client
import json
import re
import socket
from urllib.parse import urlsplit

import pytest

from dual_lm.cli import main
from servers import serving, tiny_folder

NAME = "dual-tiny"  # served with --name
PROMPTS = ("Hello there", "The king")  # greedy speculative decoding accepts drafts on both
MODES = {  # mode -> (the API's mode fields, the same as dual-lm generate options)
    "causal": ({}, []),
    "prefix": ({}, []),
    "speculative": ({"k": 3}, ["--k", "3"]),
    "diffusion": ({"steps": 4, "block_length": 4}, ["--steps", "4", "--block-length", "4"]),
}


@pytest.fixture(scope="module")
def folder(tokenizer_51200, tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("serve") / "tiny", tokenizer_51200)


@pytest.fixture(scope="module")
def server(folder):
    with serving(folder, "--name", NAME, "--max-batch", "4") as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
        yield client  # no retries: a refusal or a failure shows as it is


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def complete(client, prompt, mode="causal", max_tokens=8, **fields):
    """A greedy completion in ``mode``; ``fields`` go in the body (OpenAI's and the mode's own)."""
    openai_fields = {k: fields.pop(k) for k in ("stop", "echo", "stream", "stream_options") if k in fields}
    return client.completions.create(
        model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"mode": mode, **fields},
        **openai_fields,
    )  # fmt: skip


def streamed(client, prompt, mode="causal", max_tokens=8, **fields):
    """The chunks of a streamed greedy completion, with the usage chunk at the end."""
    usage = {"include_usage": True}
    return list(complete(client, prompt, mode, max_tokens, stream=True, stream_options=usage, **fields))


def events(chunks, kind):
    """The ``dual_lm`` events of ``kind`` (round, step, done) that the chunks carry, in order."""
    return [c.model_extra["dual_lm"] for c in chunks if (c.model_extra.get("dual_lm") or {}).get("event") == kind]


def cli(capsys, *argv) -> tuple[str, str]:
    """``dual-lm ARGV`` in this process: (stdout, stderr), after asserting it succeeded."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def request(server, method, path, body: bytes | None = None, chunked=False):
    """(status, body bytes) of one raw request; the body is sent as given (chunked: without a length)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest(method, path)
        conn.putheader("Content-Type", "application/json")
        if body is not None:
            conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))))
        conn.endheaders()
        try:
            if chunked:
                for at in range(0, len(body), 1 << 16):
                    piece = body[at : at + (1 << 16)]
                    conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                conn.send(b"0\r\n\r\n")
            elif body:
                conn.send(body)
        except (BrokenPipeError, ConnectionResetError):  # the server answered before reading it all
            pass
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


# --- every mode through the openai client, against dual-lm generate -----------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_greedy_answers_equal_dual_lm_generate(client, folder, tokenizer, capsys, mode):
    fields, flags = MODES[mode]
    for prompt in PROMPTS:
        answer = complete(client, prompt, mode, 8, **fields)
        (choice,) = answer.choices
        out, err = cli(capsys, "generate", folder, "--prompt", prompt, "--max-new-tokens", 8, "--mode", mode, *flags)
        assert out == prompt + choice.text + "\n"
        assert (choice.index, choice.finish_reason, answer.model) == (0, "length", NAME)
        ids = tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id  # the prompt is counted with its <s>
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), 8)
        assert answer.usage.total_tokens == len(ids) + 8
        stats = choice.model_extra["dual_lm"]
        if mode == "speculative":  # the statistics equal the command's stats line
            line = re.search(r"tokens per forward: [\d.]+ \((\d+) tokens in (\d+) passes\)", err)
            assert (int(line[1]), int(line[2])) == (8, stats["forwards"])
            assert stats["tokens_per_forward"] == round(8 / stats["forwards"], 4)
            assert choice.text == complete(client, prompt, "causal", 8).choices[0].text  # greedy: the causal text
        elif mode == "diffusion":
            assert stats["passes_per_token"] == round(stats["forwards"] / 8, 4) and stats["forwards"] >= 4
        else:
            assert stats == {} and "speculative" not in err


@pytest.mark.parametrize("mode", MODES)
def test_a_stream_joins_to_the_whole_answer_and_ends_with_its_usage(client, mode):
    fields = MODES[mode][0]
    whole = complete(client, PROMPTS[0], mode, 6, **fields)
    chunks = streamed(client, PROMPTS[0], mode, 6, **fields)
    *texts, last = chunks
    assert "".join(c.choices[0].text for c in texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in texts] == [None] * (len(texts) - 1) + ["length"]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in texts)
    assert events(chunks, "done") == [{"event": "done", **whole.choices[0].model_extra["dual_lm"]}]


def test_speculative_rounds_add_up_to_the_completion(client):
    """Each round adds its accepted drafts and the verifier's token; the last round's are cut at max_tokens,
    as the text is, so the pieces shown are exactly the text's tokens."""
    for prompt, max_tokens in [("The king", 12), ("Hello there", 11)]:
        chunks = streamed(client, prompt, "speculative", max_tokens, k=3)
        rounds, (done,) = events(chunks, "round"), events(chunks, "done")
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        completion = chunks[-1].usage.completion_tokens
        assert completion == max_tokens
        for r in rounds[:-1]:
            assert r["accepted"] <= len(r["drafts"]) <= 3 and len(r["added"]) == r["accepted"] + 1
        last = rounds[-1]  # cut to what the text takes: up to max_tokens
        assert last["accepted"] <= len(last["drafts"]) and 1 <= len(last["added"]) <= last["accepted"] + 1
        assert rounds[0]["drafts"] == []  # the first pass drafts the second round, it checks none
        added = [piece for r in rounds for piece in r["added"]]
        assert len(added) == completion and "".join(added) == text  # a piece is one token decoded alone
        assert done["forwards"] == len(rounds) and done["tokens_per_forward"] == round(completion / len(rounds), 4)
        accepted = sum(r["accepted"] for r in rounds)
        assert done["drafted"] == sum(min(r["accepted"] + 1, len(r["drafts"])) for r in rounds)
        assert done["acceptance_rate"] == round(accepted / done["drafted"], 4) and accepted >= 2


def test_speculative_statistics_count_only_the_tokens_answered(client):
    chunks = streamed(client, "The king", "speculative", 12, k=3, stop="uct")  # the stop ends a 3-token round
    (done,), usage = events(chunks, "done"), chunks[-1].usage
    assert usage.completion_tokens == 11 and done["forwards"] == 11
    assert done["tokens_per_forward"] == round(usage.completion_tokens / done["forwards"], 4)


@pytest.mark.parametrize("block_length", [None, 4])
def test_diffusion_steps_commit_slots_that_never_change(client, block_length):
    fields = {"steps": 4} | ({"block_length": block_length} if block_length else {})
    chunks = streamed(client, "The king", "diffusion", 8, **fields)
    steps, (done,) = events(chunks, "step"), events(chunks, "done")
    before = [None] * 8
    for n, step in enumerate(steps):
        slots, committed = step["slots"], step["committed"]
        assert step["step"] == n and len(slots) == 8 and committed
        assert all(before[s] is None and slots[s] is not None for s in committed)
        assert [s for s in range(8) if slots[s] is not None] == sorted(
            [s for s in range(8) if before[s] is not None] + committed
        )
        assert all(b is None or b == s for b, s in zip(before, slots, strict=True))  # committed slots stay
        before = slots
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert None not in before and "".join(before) == text
    assert len(steps) == 4 == done["forwards"] and done["passes_per_token"] == 0.5
    stopped = complete(client, "The king", "diffusion", 8, stop=before[3], **fields).choices[0]
    assert (stopped.text, stopped.finish_reason) == (text[: text.index(before[3])], "stop")


# --- stop strings, prompt lists, echo, models, fill -----------------------------------------------------


def test_stop_strings_cut_the_text_before_them_streamed_or_not(client):
    full = complete(client, "Hello there", "causal", 12).choices[0]
    assert full.finish_reason == "length" and full.text.startswith(" Groom Religion")
    for stop, tokens in [(" Religion", 2), ("om Rel", 2), ([" moon", "zzz"], 7)]:  # "om Rel" spans two tokens
        first = min(full.text.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full.text)
        for mode in ("causal", "speculative"):
            answer = complete(client, "Hello there", mode, 12, stop=stop)
            (choice,) = answer.choices
            assert (choice.text, choice.finish_reason) == (full.text[:first], "stop")
            assert answer.usage.completion_tokens == tokens  # up to the token that completes the stop string
            chunks = streamed(client, "Hello there", mode, 12, stop=stop)
            pieces = [c.choices[0].text for c in chunks if c.choices]
            assert "".join(pieces) == choice.text and chunks[-1].usage.completion_tokens == tokens
    assert complete(client, "Hello there", "causal", 12, stop="no such text").choices[0].finish_reason == "length"


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_a_prompt_list_gives_one_choice_per_prompt_each_as_alone(client, mode):
    prompts = ["Hello there", "Once upon a time, in a land far away", "A"]
    alone = [complete(client, p, mode, 6) for p in prompts]
    together = complete(client, prompts, mode, 6)
    assert [(c.index, c.text, c.finish_reason) for c in together.choices] == [
        (i, a.choices[0].text, "length") for i, a in enumerate(alone)
    ]
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == 18
    texts = ["", "", ""]
    for chunk in streamed(client, prompts, mode, 6):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [a.choices[0].text for a in alone]


def test_echo_puts_the_prompt_before_the_text(client):
    text = complete(client, "The king", "prefix", 5).choices[0].text
    assert complete(client, "The king", "prefix", 5, echo=True).choices[0].text == "The king" + text
    chunks = streamed(client, "The king", "prefix", 5, echo=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The king" + text
    assert chunks[-1].usage.completion_tokens == 5


def test_models_health_and_the_playground(client, server):
    assert [(m.id, m.object, m.owned_by) for m in client.models.list().data] == [(NAME, "model", "dual-lm")]
    status, health = request(server, "GET", "/health")
    assert (status, json.loads(health)) == (200, {"status": "ok", "model": NAME})
    status, page = request(server, "GET", "/")
    assert status == 200 and b"<html" in page.lower()


def test_fill_answers_as_dual_lm_fill(client, folder, capsys):
    text = "The <mask> of France is <mask>."
    answer = client.post("/fill", body={"model": NAME, "text": text, "top_k": 3}, cast_to=object)
    assert (answer["object"], answer["model"], [m["index"] for m in answer["masks"]]) == ("fill", NAME, [0, 1])
    out, _ = cli(capsys, "fill", folder, "--text", text, "--candidates", 3)
    shown = [
        f"<mask> {m['index'] + 1}: " + ", ".join(f"{c['token']!r} {c['probability']:.3f}" for c in m["candidates"])
        for m in answer["masks"]
    ]
    assert out.splitlines() == shown
    assert all(len(m["candidates"]) == 3 for m in answer["masks"])


# --- hostile requests over raw HTTP ----------------------------------------------------------------------


def body(**fields) -> bytes:
    return json.dumps({"prompt": "a", "max_tokens": 2, **fields}).encode()


BIG = json.dumps({"prompt": "a " * (1 << 19) + "!"}).encode()  # just over 1 MiB
C, F = "/v1/completions", "/v1/fill"
HOSTILE = [  # (path, body, status, what the message says, param)
    (C, body(mode="beam"), 400, "unknown mode \"beam\"; choose one of causal, prefix, diffusion, speculative", "mode"),
    (C, body(mode=""), 400, 'unknown mode ""', "mode"),
    (C, body(prompt="word " * 2100), 400, "the prompt (2102 tokens) + 2 new tokens exceed the context of 2048",
     "prompt"),
    (C, body(prompt=["a", "word " * 2100]), 400, "exceed the context of 2048", "prompt"),
    (C, body(max_tokens=2047), 400, "the prompt (2 tokens) + 2047 new tokens exceed the context of 2048", "prompt"),
    (C, body(max_tokens=0), 400, "max_tokens must be a whole number >= 1, got 0", "max_tokens"),
    (C, body(max_tokens=-1), 400, "max_tokens must be a whole number >= 1, got -1", "max_tokens"),
    (C, body(max_tokens=1.5), 400, "max_tokens must be a whole number >= 1, got 1.5", "max_tokens"),
    (C, body(max_tokens="10"), 400, 'max_tokens must be a whole number >= 1, got "10"', "max_tokens"),
    (C, body(max_tokens=True), 400, "max_tokens must be a whole number >= 1, got true", "max_tokens"),
    (C, b'{"prompt":"a","temperature":NaN}', 400, "temperature must be a finite number in [0, 2], got NaN",
     "temperature"),
    (C, b'{"prompt":"a","temperature":Infinity}', 400, "temperature must be a finite number in [0, 2], got Infinity",
     "temperature"),
    (C, body(temperature=-1), 400, "temperature must be a finite number in [0, 2], got -1", "temperature"),
    (C, body(temperature="hot"), 400, 'temperature must be a finite number in [0, 2], got "hot"', "temperature"),
    (C, b'{"prompt":"a","temperature":1' + b"0" * 400 + b"}", 400, "temperature must be a finite number in [0, 2]",
     "temperature"),
    (C, body(top_p=0), 400, "top_p must be a finite number in (0, 1], got 0", "top_p"),
    (C, body(top_p=1.5), 400, "top_p must be a finite number in (0, 1], got 1.5", "top_p"),
    (C, b'{"prompt": "a",', 400, "the request body is not valid JSON", None),
    (C, b"[1, 2]", 400, "the request body must be a JSON object", None),
    (C, b'"a"', 400, "the request body must be a JSON object", None),
    (C, b"3", 400, "the request body must be a JSON object", None),
    (C, b"", 400, "the request body is empty", None),
    (C, b'{"prompt": "\xff\xfe"}', 400, "the request body is not valid UTF-8 (byte 12)", None),
    (C, b'{"prompt": "\xed\xa0\x80"}', 400, "the request body is not valid UTF-8", None),  # a surrogate's bytes
    (C, b"[" * 100_000, 400, "the request body is nested too deeply", None),
    (C, body(prompt="\ud800"), 400, 'prompt holds a lone UTF-16 surrogate, which is not text: "\\ud800"', "prompt"),
    (C, body(stop="\udc00"), 400, "stop holds a lone UTF-16 surrogate", "stop"),
    (C, body(**{"\ud800": 1}), 400, 'unknown field "\\ud800"', "\ud800"),
    (C, body(foo=1), 400, 'unknown field "foo"', "foo"),
    (C, body(n=2), 400, "n is not supported: leave it out or set it to 1", "n"),
    (C, body(n=True), 400, "n is not supported", "n"),
    (C, body(logprobs=1), 400, "logprobs is not supported: leave it out or set it to null", "logprobs"),
    (C, body(mode="diffusion", k=2), 400, "k applies only to mode 'speculative', not 'diffusion'", "k"),
    (C, body(steps=2), 400, "steps applies only to mode 'diffusion', not 'causal'", "steps"),
    (C, body(mode="speculative", top_p=0.5), 400, "top_p applies only to the causal and prefix modes", "top_p"),
    (C, body(mode="diffusion", top_k=5), 400, "top_k applies only to the causal and prefix modes", "top_k"),
    (C, body(mode="speculative", k=0), 400, "k must be a whole number in [1, 64], got 0", "k"),
    (C, body(mode="speculative", draft=""), 400, 'unknown draft ""; choose one of one-pass, cached, full', "draft"),
    (C, body(mode="diffusion", block_length=3), 400, "block_length (3) must be <= max_tokens (2)", "block_length"),
    (C, body(stop=["a", "b", "c", "d", "e"]), 400, "stop must be a non-empty string or a list of at most 4", "stop"),
    (C, body(stop=""), 400, "stop must be a non-empty string or a list of at most 4", "stop"),
    (C, body(stream_options={"include_usage": True}), 400, "stream_options applies only with stream: true",
     "stream_options"),
    (C, body(seed=-1), 400, "seed must be a whole number in [0, 9223372036854775807], got -1", "seed"),
    (C, body(prompt=[1, 2, 3]), 400, "token arrays are not accepted", "prompt"),
    (C, body(prompt=[]), 400, "prompt must be a string or a non-empty list of strings", "prompt"),
    (C, b'{"max_tokens": 2}', 400, "prompt is required", "prompt"),
    (C, body(model="gpt-4"), 404, "model 'gpt-4' is not served here; this server serves 'dual-tiny'", "model"),
    (F, b'{"text": "no mask here"}', 400, "text must be a string with at least one <mask>", "text"),
    (F, json.dumps({"text": "word " * 2100 + "<mask>"}).encode(), 400,
     "text is 2102 tokens, more than the model's context of 2048", "text"),
    (F, b'{"text": "a <mask>", "top_k": 0}', 400, "top_k must be a whole number in [1, 100], got 0", "top_k"),
    (F, b'{"text": "a <mask>", "model": "other"}', 404, "model 'other' is not served here", "model"),
]  # fmt: skip


def assert_openai_error(status, payload: bytes, expected_status, fragment, param=...):
    error = json.loads(payload)["error"]
    assert status == expected_status, (status, error)
    assert set(error) == {"message", "type", "param", "code"} and error["code"] is None
    assert fragment in error["message"], error["message"]
    assert error["type"] == {404: "not_found_error", 413: "invalid_request_error"}.get(status, "invalid_request_error")
    if param is not ...:
        assert error["param"] == param


def test_hostile_requests_get_openai_errors_and_the_server_stays_up(server, client):
    for path, payload, status, fragment, param in HOSTILE:
        assert_openai_error(*request(server, "POST", path, payload), status, fragment, param)
        assert request(server, "GET", "/health")[0] == 200
    too_big = "the request body is over 1048576 bytes"
    assert len(BIG) > 1 << 20
    assert_openai_error(*request(server, "POST", C, BIG), 413, too_big, None)
    assert_openai_error(*request(server, "POST", C, BIG, chunked=True), 413, too_big, None)
    assert_openai_error(*request(server, "GET", C), 405, "GET /v1/completions: Method Not Allowed", None)
    assert_openai_error(*request(server, "GET", "/v1/nothing"), 404, "GET /v1/nothing: Not Found", None)
    assert_openai_error(*request(server, "POST", "/v1/chat/completions", body()), 404, "Not Found", None)
    assert request(server, "GET", "/health")[0] == 200 and server.process.poll() is None
    assert complete(client, "The king", "causal", 3).usage.completion_tokens == 3
    assert "Traceback" not in server.log.read_text()  # no refusal was an internal error


def test_the_openai_client_raises_the_refusals(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here"):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match='unknown mode "beam"'):
        complete(client, "a", "beam", 2)


# --- the request checks and the streamed text, in-process -------------------------------------------------


def test_parse_completion_fills_openai_defaults_and_each_mode_its_own():
    from dual_lm.serving.requests import Completion, parse_completion

    assert parse_completion({"prompt": "hi"}) == Completion(prompts=["hi"])
    assert parse_completion({"prompt": "hi", "max_tokens": None, "temperature": None, "mode": None}) == Completion(
        prompts=["hi"], max_tokens=16, temperature=1.0, mode="causal"
    )
    spec = parse_completion({"prompt": ["a", "b"], "mode": "speculative", "temperature": 0, "top_p": 1, "n": 1})
    assert (spec.prompts, spec.options, spec.temperature) == (["a", "b"], {"k": 4, "draft": "one-pass"}, 0.0)
    diffusion = parse_completion({"prompt": "a", "mode": "diffusion", "threshold": 0.9, "max_tokens": 8})
    assert diffusion.options == {"steps": 32, "block_length": None, "threshold": 0.9}
    sampled = parse_completion({"prompt": "a", "top_p": 0.5, "top_k": 3, "stop": "x", "seed": 7, "stream": True,
                                "stream_options": {"include_usage": True}})  # fmt: skip
    assert (sampled.top_p, sampled.top_k, sampled.stop, sampled.seed, sampled.include_usage) == (
        0.5,
        3,
        ("x",),
        7,
        True,
    )


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"prompt": ["a"] * 65}, "prompt", "prompt lists hold at most 64 prompts, got 65"),
        ({"max_tokens": 10**400}, None, None),  # accepted here; the engine refuses it against the context
        ({"temperature": 10**400}, "temperature", "temperature must be a finite number in [0, 2], got 1000"),
        ({"best_of": 2}, "best_of", "best_of is not supported: leave it out or set it to 1"),
        ({"presence_penalty": False}, "presence_penalty", "presence_penalty is not supported"),
        ({"echo": 1}, "echo", "echo must be true or false, got 1"),
        ({"stream": True, "stream_options": {"usage": True}}, "stream_options", "may hold only include_usage"),
        ({"mode": "diffusion", "threshold": 0}, "threshold", "threshold must be a finite number in (0, 1], got 0"),
        ({"mode": "speculative", "k": 65}, "k", "k must be a whole number in [1, 64], got 65"),
        ({"model": 5}, "model", "model must be a string"),
        ({"stop": ["ok", 3]}, "stop", "stop must be a non-empty string"),
        ({"prompt": "a" * 100}, None, None),
        ({"top_k": -1}, "top_k", "top_k must be a whole number >= 0, got -1"),
    ],
)
def test_parse_completion_refuses_each_bad_field_by_name(fields, param, message):
    from dual_lm.serving.requests import ApiError, parse_completion

    if message is None:
        assert parse_completion({"prompt": "a", **fields}).prompts[0] == fields.get("prompt", "a")
        return
    with pytest.raises(ApiError) as refused:
        parse_completion({"prompt": "a", **fields})
    assert (refused.value.param, refused.value.status) == (param, 400)
    assert message in refused.value.message
    assert json.dumps(refused.value.body())  # always renders


def test_parse_fill():
    from dual_lm.serving.requests import ApiError, Fill, parse_fill

    assert parse_fill({"text": "a <mask> b"}) == Fill("a <mask> b", 5)
    assert parse_fill({"text": "<mask>", "top_k": 100, "model": "m"}) == Fill("<mask>", 100)
    for bad, param, message in [
        ({"text": "a <mask>", "candidates": 3}, "candidates", 'unknown field "candidates"'),
        ({"text": ["<mask>"]}, "text", "text must be a string with at least one <mask>"),
        ({"text": "a <mask>", "top_k": 101}, "top_k", "top_k must be a whole number in [1, 100], got 101"),
        ({"text": "\ud800 <mask>"}, "text", "text holds a lone UTF-16 surrogate"),
    ]:
        with pytest.raises(ApiError) as refused:
            parse_fill(bad)
        assert refused.value.param == param and message in refused.value.message


def test_held_back_is_the_longest_end_that_could_begin_a_stop():
    from dual_lm.serving.text import held_back

    assert held_back("abc", ()) == 0
    assert held_back("abc", ("cde",)) == 1
    assert held_back("abcd", ("bcdx", "cd!")) == 3
    assert held_back("xa", ("ab", "a?")) == 1
    assert held_back("ab", ("ab",)) == 0  # "b" cannot begin "ab"; "ab" itself is a stop (cut, not held)
    assert held_back("a", ("abc",)) == 1 and held_back("", ("abc",)) == 0


def feed(tokenizer, text, prompt="The king", max_tokens=50, stops=(), extra=()):
    """A ``Continuation`` fed the tokens of ``text`` after ``prompt`` one at a time: (it, the deltas)."""
    from dual_lm.serving.text import Continuation

    prompt_ids, ids = tokenizer(prompt)["input_ids"], tokenizer(text)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    cont = Continuation(tokenizer, prompt_ids, max_tokens, stops)
    deltas = [cont.add([t]) for t in [*ids[len(prompt_ids) :], *extra]]
    return cont, [*deltas, cont.finish()]


def test_a_stop_string_split_across_tokens_is_held_back_and_never_sent(tokenizer):
    text = "The king said: stop here. And more"
    cont, deltas = feed(tokenizer, text, stops=("stop here",))
    assert (cont.text, cont.finish_reason, len(cont.tokens)) == (" said: ", "stop", 4)
    assert "".join(deltas) == " said: " and not any("stop" in d or "here" in d or "more" in d for d in deltas)
    cont, deltas = feed(tokenizer, text, stops=("stop there", "And"))  # held, then let go when it diverges
    assert deltas[:4] == [" said", ":", " ", "stop here"] and cont.text == " said: stop here. "
    assert "".join(deltas) == cont.text and cont.finish_reason == "stop"
    cont, deltas = feed(tokenizer, text, max_tokens=3, stops=("stop here",))  # the limit sends what was held
    assert (cont.text, cont.finish_reason, deltas[:3]) == (" said: stop", "length", [" said", ":", " stop"])
    assert set(deltas[3:]) == {""}  # the tokens after the limit are ignored
    cont, deltas = feed(tokenizer, text, stops=("ing sa",))  # across the prompt's end: not the completion's
    assert "".join(deltas) == cont.text == " said: stop here. And more" and cont.finish_reason == "stop"


def test_a_character_split_across_tokens_is_never_sent_half(tokenizer):
    from dual_lm.tokens import EOS_ID

    for text, new in [("The king 😀 and then", " 😀 and then"), ("The king said 東京 is big", " said 東京 is big")]:
        cont, deltas = feed(tokenizer, text, extra=[EOS_ID, 300])
        assert "".join(deltas) == cont.text == new and not any("\ufffd" in d for d in deltas)
        assert cont.finish_reason == "stop" and EOS_ID not in cont.tokens
    cont, deltas = feed(tokenizer, "The king said 東京 is big", max_tokens=3)  # the limit falls inside 東
    assert cont.finish_reason == "length" and "".join(deltas) == cont.text == " said \ufffd"
    cont, deltas = feed(tokenizer, "The king said 東京 is big", stops=("京",))
    assert "".join(deltas) == cont.text == " said 東" and cont.finish_reason == "stop"


# --- dual-lm serve's refusals -------------------------------------------------------------------------------


def refused(capsys, argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("dual-lm serve: error: "), err
    return lines[0]


def test_serve_refuses_before_loading_the_model(folder, tmp_path, capsys, monkeypatch):
    import dual_lm.folder

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(dual_lm.folder, "load_folder", no_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = refused(capsys, ["serve", tmp_path / "none", "--port", port])  # the folder is named first
        assert f"model folder {tmp_path / 'none'} does not exist" in line
        line = refused(capsys, ["serve", folder, "--port", port])
        assert line == f"dual-lm serve: error: cannot listen on 127.0.0.1:{port}: the address is in use"
    line = refused(capsys, ["serve", folder, "--port", 70000])
    assert "argument --port: must be in [0, 65535], got 70000" in line
    line = refused(capsys, ["serve", folder, "--host", "localhost", "--port", 0])
    assert "--host must be an IP address (such as 127.0.0.1 or ::1), got 'localhost'" in line
    assert "--name must not be empty" in refused(capsys, ["serve", folder, "--name", " ", "--port", 0])
    assert "argument --max-batch: must be in [1, 1024], got 0" in refused(capsys, ["serve", folder, "--max-batch", 0])


def test_a_body_not_sent_as_json_is_refused_so_no_web_page_can_post_unasked(server):
    """A page on any site may send a "simple" text/plain POST to loopback without a preflight: 415."""
    import http.client
    from urllib.parse import urlsplit

    netloc = urlsplit(server.url)
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        conn = http.client.HTTPConnection(netloc.hostname, netloc.port, timeout=30)
        headers = {} if kind is None else {"Content-Type": kind}
        conn.request("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": 1}', headers)
        answer = conn.getresponse()
        assert_openai_error(answer.status, answer.read(), 415, "send the body as Content-Type: application/json")
        conn.close()
