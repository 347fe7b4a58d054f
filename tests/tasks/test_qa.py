"""The reference-answer checker behind PPO's qa reward: correct, abstain or wrong."""

import pytest

from lmforge.tasks.qa import UNANSWERABLE, qa_check, qa_reference


@pytest.mark.parametrize(
    "answer, reference, outcome",
    [
        ("The capital of France is Paris.", "Paris", "correct"),
        ("  PARIS ", "paris", "correct"),
        ("It is a Parisian dish.", "Paris", "wrong"),  # a word, not a substring
        ("The answer is Lyon.", "Paris", "wrong"),
        ("I don't know.", "Paris", "abstain"),
        ("I’m not sure, maybe Paris?", "Paris", "abstain"),  # a hedge is not credited
        ("Sorry, I cannot answer that.", "Paris", "abstain"),
        ("The passage does not contain the answer to the question.", "Paris", "abstain"),
        ("The capital is not specified in the passage.", "Paris", "abstain"),
        ("The passage doesn’t contain the answer.", "Paris", "abstain"),  # curly apostrophe
        ("There were 1,000 people.", "1000", "correct"),
        ("The total is 42.0 dollars", "42", "correct"),
        ("It costs $18.", "18", "correct"),
        ("It is 142.", "42", "wrong"),
        ("Version x2 of it.", "2", "wrong"),
        ("首都是北京。", "北京", "correct"),
        ("答案是42。", "42", "correct"),
        ("是上海。", "北京", "wrong"),
        ("我不知道。", "北京", "abstain"),
        ("这个问题我不确定。", "北京", "abstain"),
    ],
)
def test_qa_checker(answer, reference, outcome):
    assert qa_check(answer, reference) == outcome


# made-up answers to a question whose passage does not hold the answer
@pytest.mark.parametrize(
    "answer, outcome",
    [
        ("I don't know.", "correct"),  # abstaining is the right reply
        ("The passage does not say; I do not know.", "correct"),
        ("The passage does not provide any information about it.", "correct"),
        ("我不知道。", "correct"),
        ("In 1066.", "wrong"),
        ("unanswerable", "wrong"),  # naming the marker is not an abstention
        ("", "wrong"),
    ],
)
def test_qa_checker_unanswerable(answer, outcome):
    assert qa_check(answer, UNANSWERABLE) == outcome
    assert qa_check(answer, f" {UNANSWERABLE} ") == outcome


def test_qa_reference_keeps_the_unanswerable_marker():
    assert qa_reference(UNANSWERABLE) == UNANSWERABLE
    assert qa_reference("Rollo #### 42") == "42"
    with pytest.raises(ValueError, match="'answer' is empty"):
        qa_reference("  ")
