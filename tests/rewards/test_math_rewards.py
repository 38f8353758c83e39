"""Tests for rlhfjax.rewards.math: answer extraction and checkers on tables of tricky cases.

Each expected value follows from the rules in the module docstring; the comment on a row says
which rule decides it.
"""

import fractions

import numpy as np
import pytest

from rlhfjax import rewards
from rlhfjax.rewards import math as math_rewards

F = fractions.Fraction


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} here", "\\frac{\\sqrt{3}}{2}"),
    ("escaped braces \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("the last box wins: \\boxed{1} then \\boxed{2}", "2"),
    ("inner box of a nested pair: \\boxed{\\boxed{5}}", "5"),
    ("fbox: \\fbox{7}", "7"),
    ("brace-less: $\\boxed 5$", "5"),
    ("empty: \\boxed{}", ""),
    ("unbalanced: \\boxed{\\frac{1}{2}", None),
    ("an escaped brace is no brace: \\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
    ("no box at all: 5", None),
])
def test_extract_boxed(text, expected):
  assert rewards.extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", F(72)),  # "####" wins
    ("#### 1,234", F(1234)),                    # thousands separator
    ("#### $1,234.00.", F(1234)),               # dollar sign, decimals, trailing period
    ("#### -3", F(-3)),                         # sign
    ("#### \u22127", F(-7)),                    # Unicode minus
    ("#### 5\nor maybe \\boxed{6}", F(5)),      # "####" beats a box
    ("#### 5 then 6", F(5)),                    # the first number after the marker
    ("#### 5\n#### 6", F(6)),                   # ... the last marker
    ("I got 8\n#### (unsure)", None),          # explicit marker without a number: missing
    ("I think \\boxed{42} and not 7", F(42)),   # a box beats the last number
    ("\\boxed{\\frac{3}{4}} of them", F(3, 4)),  # boxed LaTeX fraction
    ("\\boxed{18 \\text{ dollars}}", F(18)),    # the number inside a boxed phrase
    ("\\boxed{2 + 3 = 5}", F(5)),               # the last number inside the box
    ("\\boxed{many}, about 9", None),           # a box without a number: missing
    ("10 - 5 = 5", F(5)),                       # last number
    ("10-5", F(5)),                             # '-' after a digit is subtraction, not a sign
    ("The answer is .5", F(1, 2)),              # leading decimal point
    ("It is 3/4", F(3, 4)),                     # simple fraction
    ("1,2,3", F(3)),                            # a list of numbers, not a thousands group
    ("1,2345", F(2345)),                        # not a thousands group: 1 and 2345
    ("She earns 1,500, which is it", F(1500)),  # a comma before prose ends the number
    ("#### 1,500, dollars", F(1500)),
    ("#### 1,234.5,", F(2469, 2)),
    ("50%", F(50)),                             # percent sign ignored
    ("3/0 or 4", F(4)),                         # division by zero is not a number
    ("no numbers", None),
])
def test_extract_gsm8k_answer(text, expected):
  assert rewards.extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize("completion, reference, reward", [
    ("so 18 apples\n#### 18", "18", 1.0),
    ("The answer is $1,234.00.", "1234", 1.0),
    ("#### 18.00", "18", 1.0),                  # exact rational comparison
    ("#### 18.5", "18", 0.0),
    ("#### 3", "-3", 0.0),                      # the sign matters
    ("0.75", "3/4", 1.0),
    ("0.333", "1/3", 0.0),                      # no rounding tolerance
    ("#### 18.004", "18", 0.0),
    ("#### 0.125", "1/8", 1.0),                 # exact beyond two decimals
    ("#### 72", "She sold 24 + 48\n#### 72", 1.0),  # a full reference solution
    ("I do not know", "5", 0.0),
])
def test_gsm8k_reward(completion, reference, reward):
  assert rewards.gsm8k_reward(completion, reference) == reward


@pytest.mark.parametrize("answer, normalized", [
    (" \\dfrac{1}{2} ", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac1{2}", "\\frac{1}{2}"),
    ("\\frac{1}2", "\\frac{1}{2}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("x \\rightarrow \\infty", "x\\rightarrow\\infty"),  # \right inside \rightarrow is kept
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("90°", "90"),
    ("50\\%", "50"), ("\\$5", "5"),
    ("5.", "5"),
    ("\\text{(B)}", "(B)"), ("\\textbf{yes}", "yes"), ("\\mbox{a \\text{b}}", "ab"),
    ("1{,}000", "1,000"),
    ("3\\,000\\!", "3000"),
    ("x = 5", "5"), ("y=2x+3", "2x+3"),
    ("xy=5", "xy=5"),                           # only a single-letter left-hand side goes
    ("5\\text{ cm}", "5cm"),                    # units are not removed
])
def test_normalize_math_answer(answer, normalized):
  assert rewards.normalize_math_answer(answer) == normalized


@pytest.mark.parametrize("completion, reference, reward", [
    ("So \\boxed{\\frac{1}{2}}.", "\\frac12", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),       # fraction / decimal equivalence
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{-1}{2}", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{5.}", "5", 1.0),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}", 1.0),
    ("\\boxed{\\text{(B)}}", "(C)", 0.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1.0),
    ("\\boxed{1} is wrong, \\boxed{2} is right", "2", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 0.0),   # no symbolic equivalence
    ("\\boxed{(1,2)}", "(2,1)", 0.0),           # order matters
    ("\\boxed{\\frac{1}{0}}", "1", 0.0),        # not a number; strings differ
    ("\\boxed{}", "1", 0.0),                    # an empty answer never matches
    ("\\boxed{3", "3", 0.0),                    # unbalanced box: no answer
    ("The answer is 3.", "3", 0.0),             # MATH answers must be boxed
])
def test_math_reward(completion, reference, reward):
  assert rewards.math_reward(completion, reference) == reward


@pytest.mark.parametrize("reward_fn, name", [
    (rewards.gsm8k_reward, "gsm8k"), (rewards.math_reward, "math")])
def test_batch_rewards_equal_a_loop(reward_fn, name):
  completions = ["#### 4", "\\boxed{4}", "4", "\\boxed{5}", "none"]
  references = ["4", "4", "5", "5", "4"]
  expected = np.asarray([reward_fn(c, r) for c, r in zip(completions, references)], np.float32)
  for fn in (reward_fn, name):
    got = rewards.batch_rewards(fn, completions, references)
    assert got.dtype == np.float32 and got.shape == (5,)
    np.testing.assert_array_equal(got, expected)
  assert expected.sum() > 0 and expected.sum() < 5  # the batch mixes right and wrong answers


@pytest.mark.parametrize("call, match", [
    (lambda: rewards.gsm8k_reward("#### 4", "four"), "holds no number"),
    (lambda: rewards.math_reward("\\boxed{4}", " \\, "), "empty after normalisation"),
    (lambda: rewards.batch_rewards("gsm", ["a"], ["1"]), "unknown reward"),
    (lambda: rewards.batch_rewards("gsm8k", ["a", "b"], ["1"]), "2 completions but 1"),
])
def test_bad_references_and_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_math_number_reads_only_plain_numbers():
  assert math_rewards.math_number("-1,234.5") == F(-24690, 20)
  assert math_rewards.math_number("\\frac{3}{-6}") == F(-1, 2)
  assert math_rewards.math_number("\\frac{\\pi}{2}") is None
  assert math_rewards.math_number("1,2") is None  # a tuple, not a thousands group


def test_empty_answers_never_match():
  assert not rewards.math_answers_equal("\\,", " ")  # both empty after normalisation
  assert not rewards.math_answers_equal("", "")
