"""The six standard expressions: exact result, type and steps, text encoding."""

from twisted_cacheproxy.calculator.expression import evaluate, evaluate_with_steps
from twisted_cacheproxy.calculator.parser import parse


def test_vector_result_and_steps(vector):
    value, steps = evaluate_with_steps(parse(vector["text"]), 100_000)
    assert repr(value) == vector["result_repr"]
    assert type(value).__name__ == vector["result_type"]
    assert steps == vector["steps"]


def test_every_step_reads_back_to_the_result(vector):
    _, steps = evaluate_with_steps(parse(vector["text"]), 100_000)
    for step in steps:
        assert repr(evaluate(parse(step))) == vector["result_repr"], step
