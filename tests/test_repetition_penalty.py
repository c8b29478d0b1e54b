"""The repetition penalty end to end, against an independent statement of the rule: at every step the plain
model's logits over the whole text (no cache), each token already in the prompt or generated so far divided
by the penalty when its score is positive and multiplied by it when negative (HuggingFace's
RepetitionPenaltyLogitsProcessor), then the most likely token. generate(), the engine, the exported model's
runner (and the server, in test_serve) must all follow it, generated tokens included."""

import pytest

import glm3
from conftest import PENALTY, PENALTY_TOKENS, follows_the_penalty_rule, penalised_reference
from glm3.deploy.export import export_model
from glm3.deploy.infer import MindIRRunner
from glm3.runtime.engine import EngineConfig
from glm3.runtime.sampling import SamplingParams
from glm3.serve.engines import load_engine


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop"), *tokenizer.encode("天气天气好")]


@pytest.fixture(scope="module")
def expected(tiny_model, prompt):
    full = penalised_reference(tiny_model, prompt)
    # The history of generated tokens decides tokens here: a penalty over the prompt alone chooses others, and
    # no penalty others again (so dropping either part of the history fails the tests below).
    assert full != penalised_reference(tiny_model, prompt, history_of_generated=False)
    assert (
        full
        != glm3.generate(tiny_model, [prompt], max_new_tokens=PENALTY_TOKENS, eos_token_id=[])[
            0, len(prompt) :
        ].tolist()
    )
    return full


@pytest.mark.parametrize("kernels", ["plain", "cpu"])
def test_generate_penalises_the_prompt_and_the_generated_tokens(tiny_dir, tiny_model, prompt, expected, kernels):
    model = glm3.load_model(tiny_dir, kernels_backend=kernels)
    out = glm3.generate(model, [prompt], max_new_tokens=PENALTY_TOKENS, repetition_penalty=PENALTY, eos_token_id=[])
    follows_the_penalty_rule(tiny_model, prompt, out[0, len(prompt) :].tolist())


def test_the_engine_penalises_the_prompt_and_the_generated_tokens(tiny_dir, tiny_model, prompt, expected):
    engine, _ = load_engine(tiny_dir, EngineConfig())
    seq = engine.add(prompt, SamplingParams(repetition_penalty=PENALTY), PENALTY_TOKENS, ignore_stop=True)
    while engine.has_work():
        engine.step()
    follows_the_penalty_rule(tiny_model, prompt, seq.output)


@pytest.mark.parametrize("paged", [False, True])
def test_the_export_runner_penalises_the_prompt_and_the_generated_tokens(
    tiny_dir, tiny_model, prompt, expected, paged, tmp_path
):
    directory = export_model(tiny_dir, tmp_path / "export", batch_size=1, prompt_length=32, seq_length=96, paged=paged)
    runner = MindIRRunner(directory)
    [out] = runner.generate([prompt], max_new_tokens=PENALTY_TOKENS, repetition_penalty=PENALTY, stop_token_ids=[])
    follows_the_penalty_rule(tiny_model, prompt, out)
