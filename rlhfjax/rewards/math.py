"""Final-answer checkers for math problems, usable as verifiable rewards (host side, on text).

Unlike the jittable token-level rewards of the synthetic task, these read decoded completions: a
rollout decodes its samples, scores them here, and feeds the [B] rewards back to the device.

GSM8K (`gsm8k_reward`). The predicted answer is, in order of precedence:
  1. the first number after the last "####" (the dataset's own answer format);
  2. else the number in the last `\\boxed{...}`;
  3. else the last number in the text.
If a "####" or `\\boxed{}` is present but holds no number, the answer is missing (reward 0): an
explicit final answer is taken at its word. Numbers may carry a sign (`-`, `+`, the Unicode
minus), thousands separators (`1,234`; `1,2,3` is three numbers), decimals (`18.50`, `.5`) and
simple fractions (`3/4`); `$` and `%` around them are ignored. A `-` right after a digit or letter
is a subtraction, not a sign (`10-5` reads as 5). Values compare exactly as rationals, so
`18.00 == 18` and `0.75 == 3/4`, but `0.333 != 1/3`.

MATH (`math_reward`). The predicted answer is the content of the last `\\boxed{...}` (or
`\\fbox{...}`, or the brace-less `\\boxed 5`), with nested braces and escaped braces (`\\{`, `\\}`)
matched; no box, or an unbalanced one, scores 0. Both answers are normalised by
`normalize_math_answer` and compared as strings, and as numbers when both are plain numbers.

Normalised: surrounding and inner whitespace and LaTeX spacing (`\\,` `\\;` `\\:` `\\!` `\\ ` `~`
`\\quad` `\\qquad`); `\\left` / `\\right`; `\\dfrac` / `\\tfrac` -> `\\frac`; shorthand `\\frac12`,
`\\frac1{2}`, `\\frac{1}2` -> `\\frac{1}{2}` and `\\sqrt2` -> `\\sqrt{2}`; `\\text{}`, `\\textbf{}`,
`\\textit{}`, `\\mathrm{}`, `\\mathbf{}`, `\\mbox{}` unwrapped to their content; degrees (`^\\circ`,
`^{\\circ}`, `°`); `\\%`, `%`, `\\$`, `$`; trailing periods; LaTeX thousands `{,}`; a single-letter
left-hand side (`x = 5` -> `5`); and simple number equivalence: integers, decimals, `a/b` and
`\\frac{a}{b}` with integer or decimal a, b and an optional sign compare as exact rationals
(`0.5 == \\frac{1}{2} == 1/2`, `-\\frac{1}{2} == \\frac{-1}{2}`, `1,000 == 1000`).
Not normalised (compared as written): symbolic equivalence (`\\sqrt{8}` vs `2\\sqrt{2}`,
`\\frac{1}{\\sqrt{3}}` vs `\\frac{\\sqrt{3}}{3}`), the order of elements in sets, tuples or lists,
intervals vs inequalities, units written as words (`5\\text{ cm}` becomes `5cm`, not `5`), mixed
numbers (`1\\frac{1}{2}`), scientific notation, `\\pi` vs its decimal value, degrees vs radians,
matrices in different environments, and letter case.

References: GSM8K, Cobbe et al. arXiv 2110.14168 (the "####" answer format); MATH, Hendrycks et
al. arXiv 2103.03874 (boxed answers; their `is_equiv` normaliser is the model for the lighter one
here).
"""

from __future__ import annotations

import fractions
import re
from collections.abc import Callable, Sequence

import numpy as np

GSM8K_ANSWER_MARKER = "####"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MINUS = "\u2212"  # Unicode minus sign, common in generated text

# A number: optional sign (not right after a digit, letter or '.', where '-' is subtraction), then
# a fraction a/b, a number with thousands separators, a decimal, or an integer.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+\u2212]?)"
    r"(?P<body>\d+/\d+(?![\d/])"
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d|,\d)"  # a comma before prose ends the number
    r"|\d+(?:\.\d+)?"
    r"|\.\d+)"
)
_TEXT_COMMANDS = ("\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox")
_SPACING = ("\\qquad", "\\quad", "\\,", "\\;", "\\:", "\\!", "\\ ", "~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°")
_DECIMAL = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_PLAIN_NUMBER = re.compile(rf"(?:{_DECIMAL})")
_SLASH_FRACTION = re.compile(r"[-+]?\d+/\d+")
_LATEX_FRACTION = re.compile(
    rf"(?P<sign>[-+]?)\\frac\{{(?P<a>{_DECIMAL})\}}\{{(?P<b>{_DECIMAL})\}}")


def _matching_brace(text: str, open_index: int) -> int | None:
  """Index of the `}` closing the `{` at `open_index`, skipping escaped braces; None if none."""
  depth = 0
  i = open_index
  while i < len(text):
    char = text[i]
    if char == "\\":
      i += 2  # an escaped character (`\{`, `\}`, `\\`) or a command's first letter: never a brace
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def extract_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` (or brace-less `\\boxed x`) in `text`.

  Returns:
    The content between the matched braces, or None when there is no box or it is unbalanced.
  """
  start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
  if start < 0:
    return None
  i = start + len(command)
  if i < len(text) and text[i] == "{":
    close = _matching_brace(text, i)
    return None if close is None else text[i + 1:close]
  if i < len(text) and text[i] == " ":  # `\boxed 5`: the next token, up to a space or `$`
    token = re.match(r"\s*([^\s$]+)", text[i:])
    return token.group(1) if token else None
  return None


def _to_fraction(sign: str, body: str) -> fractions.Fraction:
  if "/" in body:
    numerator, denominator = body.split("/")
    if int(denominator) == 0:
      raise ZeroDivisionError
    value = fractions.Fraction(int(numerator), int(denominator))
  else:
    value = fractions.Fraction(body.replace(",", ""))
  return -value if sign in ("-", _MINUS) else value


def _numbers(text: str) -> list[fractions.Fraction]:
  out = []
  for match in _NUMBER.finditer(text):
    try:
      out.append(_to_fraction(match.group("sign"), match.group("body")))
    except ZeroDivisionError:  # "3/0" is not a number; skip it
      continue
  return out


def extract_gsm8k_answer(text: str) -> fractions.Fraction | None:
  """The numeric final answer of a GSM8K-style solution (see the module docstring for the rules).

  Returns:
    The answer as an exact rational, or None when there is none.
  """
  head, marker, tail = text.rpartition(GSM8K_ANSWER_MARKER)
  del head
  if marker:
    numbers = _numbers(tail)
    return numbers[0] if numbers else None
  boxed = extract_boxed(text)
  if boxed is not None:
    value = math_number(normalize_math_answer(boxed))
    if value is not None:
      return value
    numbers = _numbers(boxed)
    return numbers[-1] if numbers else None
  numbers = _numbers(text)
  return numbers[-1] if numbers else None


def _reference_value(reference: str) -> fractions.Fraction:
  value = extract_gsm8k_answer(reference)
  if value is None:
    raise ValueError(f"GSM8K reference answer {reference!r} holds no number")
  return value


def gsm8k_reward(completion: str, reference: str) -> float:
  """1.0 if the completion's GSM8K answer equals the reference's, else 0.0.

  Args:
    completion: the decoded model output.
    reference: the reference final answer ("72", "1,000") or a full solution ending "#### 72".

  Raises:
    ValueError: if the reference holds no number.
  """
  expected = _reference_value(reference)
  return float(extract_gsm8k_answer(completion) == expected)


def _unwrap_commands(text: str, commands: Sequence[str]) -> str:
  """Replaces each `\\command{content}` (nested braces allowed) by `content`."""
  pattern = re.compile("(" + "|".join(re.escape(c) for c in commands) + r")(?![a-zA-Z])\s*\{")
  while (match := pattern.search(text)) is not None:
    open_index = match.end() - 1
    close = _matching_brace(text, open_index)
    if close is None:
      break  # unbalanced: leave the rest as written
    text = text[:match.start()] + text[open_index + 1:close] + text[close + 1:]
  return text


def normalize_math_answer(answer: str) -> str:
  """The light normal form of a MATH answer (what is and is not normalised: module docstring)."""
  s = _unwrap_commands(answer.strip(), _TEXT_COMMANDS)
  for command in _SPACING:
    s = s.replace(command, "")
  s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _DEGREES.sub("", s)
  for symbol in ("\\%", "%", "\\$", "$"):
    s = s.replace(symbol, "")
  s = re.sub(r"\s+", "", s)
  s = s.replace("{,}", ",").rstrip(".")
  # Shorthand arguments: \frac12 -> \frac{1}{2}, \frac1{2}, \frac{1}2, \sqrt2 -> \sqrt{2}.
  s = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac([^{\\])\{", r"\\frac{\1}{", s)
  s = re.sub(r"\\frac\{([^{}]*)\}([^{\\])", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\sqrt([^{\[\\])", r"\\sqrt{\1}", s)
  # A single-letter left-hand side: "x=5" -> "5" (as in Hendrycks et al.'s normaliser).
  s = re.sub(r"^[a-zA-Z]=(?=.)", "", s)
  return s


def _signed_value(text: str) -> fractions.Fraction:
  sign = text[0] if text and text[0] in ("-", "+", _MINUS) else ""
  return _to_fraction(sign, text[len(sign):])


def math_number(normalized: str) -> fractions.Fraction | None:
  """The exact value of a normalised answer that is a plain number, `a/b` or `\\frac{a}{b}`."""
  try:
    if _PLAIN_NUMBER.fullmatch(normalized) or _SLASH_FRACTION.fullmatch(normalized):
      return _signed_value(normalized)
    if match := _LATEX_FRACTION.fullmatch(normalized):
      value = _signed_value(match["a"]) / _signed_value(match["b"])
      return -value if match["sign"] == "-" else value
  except ZeroDivisionError:
    return None
  return None


def math_answers_equal(predicted: str, reference: str) -> bool:
  """Whether two MATH answers agree after `normalize_math_answer` (as strings or as numbers)."""
  a, b = normalize_math_answer(predicted), normalize_math_answer(reference)
  if not a or not b:
    return False
  if a == b:
    return True
  value_a, value_b = math_number(a), math_number(b)
  return value_a is not None and value_a == value_b


def math_reward(completion: str, reference: str) -> float:
  """1.0 if the last boxed answer of the completion equals the reference answer, else 0.0.

  Args:
    completion: the decoded model output.
    reference: the reference final answer (e.g. MATH-500's `answer`), not boxed.

  Raises:
    ValueError: if the reference is empty after normalisation.
  """
  if not normalize_math_answer(reference):
    raise ValueError(f"MATH reference answer {reference!r} is empty after normalisation")
  predicted = extract_boxed(completion)
  return float(predicted is not None and math_answers_equal(predicted, reference))


REWARD_FNS: dict[str, Callable[[str, str], float]] = {"gsm8k": gsm8k_reward, "math": math_reward}


def batch_rewards(reward_fn: Callable[[str, str], float] | str, completions: Sequence[str],
                  references: Sequence[str]) -> np.ndarray:
  """Scores a batch of decoded completions: float32 [B] of `reward_fn(completion_b, reference_b)`.

  Args:
    reward_fn: a checker, or its name in `REWARD_FNS` ("gsm8k", "math").
    completions: B decoded completions.
    references: B reference answers (one per completion; repeat a prompt's reference for each of
      its G samples).

  Raises:
    ValueError: on an unknown checker name or a length mismatch.
  """
  if isinstance(reward_fn, str):
    if reward_fn not in REWARD_FNS:
      raise ValueError(f"unknown reward {reward_fn!r}; expected one of {sorted(REWARD_FNS)}")
    reward_fn = REWARD_FNS[reward_fn]
  if len(completions) != len(references):
    raise ValueError(f"got {len(completions)} completions but {len(references)} references")
  return np.asarray([reward_fn(c, r) for c, r in zip(completions, references)], np.float32)
