"""What the vLLM engine sends to vLLM and how it reads vLLM's answers, without a server (the
engine against a real vLLM server: tests/vllm)."""

from __future__ import annotations

from app.serving.sampling import SamplingParams, TokenLogprob
from app.serving.vllm_engine import _completion_body, _logprobs


def test_a_request_carries_every_sampling_parameter_and_the_prompt_as_token_ids():
    params = SamplingParams(
        max_tokens=7, temperature=0.0, top_p=0.5, stop=("\n",), seed=3, presence_penalty=0.1,
        frequency_penalty=0.2, logit_bias=((5, -100.0),), logprobs=2,
    )  # fmt: skip
    body = _completion_body([1, 2, 3], "v1", params)
    assert body["model"] == "v1" and body["prompt"] == [1, 2, 3] and body["stream"] is True
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (7, 0.0, 0.5)
    assert body["stop"] == ["\n"] and body["seed"] == 3 and body["logit_bias"] == {"5": -100.0}
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.1, 0.2)
    assert body["logprobs"] == 2 and body["return_tokens_as_token_ids"] is True
    plain = _completion_body([1], "base", SamplingParams(max_tokens=1))
    assert not {"stop", "seed", "logit_bias", "logprobs"} & set(plain)


def test_logprobs_named_by_token_id_become_detoxs_best_first_and_cut_to_the_asked_number():
    block = {
        "tokens": ["token_id:7", "token_id:9"],
        "token_logprobs": [-0.5, -1.5],
        "top_logprobs": [
            {"token_id:7": -0.5, "token_id:1": -2.0, "token_id:4": -1.0},
            {"token_id:3": -0.1, "token_id:9": -1.5},
        ],
    }
    assert _logprobs(block, 2) == [
        TokenLogprob(7, -0.5, ((7, -0.5), (4, -1.0))),
        TokenLogprob(9, -1.5, ((3, -0.1), (9, -1.5))),
    ]
    assert _logprobs(block, None) == [] and _logprobs(None, 2) == []
