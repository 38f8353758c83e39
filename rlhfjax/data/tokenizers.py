"""Hugging Face and SentencePiece tokenizers, chat formats, and prompt/response encoding.

`load_tokenizer(path)` reads a local directory (or file) holding a HF `tokenizers` tokenizer
(`tokenizer.json`) or a SentencePiece model (`tokenizer.model`), with the special tokens and chat
template of its `tokenizer_config.json` / `chat_template.jinja` when present.

Chat data enters the pipeline as token ids in the batching layout (`rlhfjax.data.batching`):
`encode_sft_example` / `encode_preference_example` return `{"prompt": ids, "response": ids}` /
`{"prompt", "chosen", "rejected"}`, which `sft_batch` / `preference_batch` pad, putting the
prompt outside and the response (end-of-turn token included) inside the loss mask.

How a conversation is split: the prompt is the rendered conversation with the generation prompt
(`add_generation_prompt=True`: everything the model sees before it starts answering); the
response is what rendering the conversation *with* the assistant's answer adds after that prefix,
cut just after its last end-of-turn token (ChatML puts a newline after `<|im_end|>`; it is not
part of what a sampler that stops at `<|im_end|>` produces), or with the end-of-turn token
appended when the template writes none. Prompt and response are tokenised separately, exactly as
a sampler sees them: prompt ids, then generated ids.

Chat formats: "template" renders the tokenizer's own jinja `chat_template` with transformers'
`apply_chat_template` (needs `transformers`); "llama3" and "chatml" are built in (no
dependencies). The default is "template" when the tokenizer has one and transformers is
installed, else the built-in format whose special tokens the vocabulary contains.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CHAT_FORMATS = ("template", "llama3", "chatml")


@dataclasses.dataclass(frozen=True)
class _BuiltinFormat:
  """A built-in chat format: how one message and the generation prompt are written."""
  begin: str  # written once, before the first message
  message: str  # with {role} and {content}
  generation_prompt: str
  end_of_turn: str
  strip_content: bool


_BUILTIN = {
    # Meta-Llama-3-8B-Instruct `chat_template` (content trimmed, BOS before the first message).
    "llama3": _BuiltinFormat(
        begin="<|begin_of_text|>",
        message="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
        strip_content=True,
    ),
    # ChatML (Qwen2 / Qwen2.5 family). Qwen2.5's own template also inserts a default system
    # message when there is none; the built-in format does not.
    "chatml": _BuiltinFormat(
        begin="",
        message="<|im_start|>{role}\n{content}<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>",
        strip_content=False,
    ),
}


def _token_content(value: Any) -> str | None:
  """A special token from tokenizer_config.json: a string or an AddedToken dict."""
  if isinstance(value, Mapping):
    return value.get("content")
  return value


class TextTokenizer:
  """A text tokenizer with special tokens and an optional chat template.

  Wraps a `tokenizers.Tokenizer` (kind "hf") or a `sentencepiece.SentencePieceProcessor`
  (kind "sentencepiece") behind one interface. `encode` never adds BOS/EOS by itself (chat
  formats write them) and parses special-token strings in the text (`<|eot_id|>` -> its id).

  Attributes:
    kind: "hf" or "sentencepiece".
    vocab_size: number of ids (one past the largest id), added tokens included.
    bos_token, eos_token, pad_token: special token strings or None.
    chat_template: the jinja chat template or None.
  """

  def __init__(self, backend: Any, *, kind: str, bos_token: str | None = None,
               eos_token: str | None = None, pad_token: str | None = None,
               chat_template: str | None = None):
    if kind not in ("hf", "sentencepiece"):
      raise ValueError(f"tokenizer kind must be 'hf' or 'sentencepiece', got {kind!r}")
    self.backend = backend
    self.kind = kind
    self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
    self.chat_template = chat_template
    if kind == "hf":
      vocab = backend.get_vocab(with_added_tokens=True)
      self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True),
                            max(vocab.values()) + 1)
      self._special = {t.content: i for i, t in backend.get_added_tokens_decoder().items()
                       if t.special}
    else:
      self.vocab_size = backend.get_piece_size()
      # Control symbols (<s>, </s>) are not matched in text by SentencePiece; user-defined
      # symbols are, so only the former need splitting out by hand.
      self._special = {backend.id_to_piece(i): i for i in range(self.vocab_size)
                       if backend.is_control(i)}
    for name in ("bos_token", "eos_token", "pad_token"):
      token = getattr(self, name)
      if token is not None and self.token_to_id(token) is None:
        raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")

  # -- ids -----------------------------------------------------------------------------------

  def token_to_id(self, token: str) -> int | None:
    """The id of one token string, or None if the vocabulary lacks it."""
    if token in self._special:
      return self._special[token]
    if self.kind == "hf":
      return self.backend.token_to_id(token)
    i = self.backend.piece_to_id(token)
    return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i

  def _id_of(self, name: str) -> int | None:
    token = getattr(self, name)
    return None if token is None else self.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self._id_of("bos_token")

  @property
  def eos_id(self) -> int | None:
    return self._id_of("eos_token")

  @property
  def pad_id(self) -> int | None:
    return self._id_of("pad_token")

  # -- text <-> ids --------------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, special-token strings mapped to their ids, no BOS/EOS added."""
    if not isinstance(text, str):
      raise ValueError(f"encode takes a str, got {type(text).__name__}")
    if self.kind == "hf":
      return list(self.backend.encode(text, add_special_tokens=False).ids)
    if not self._special:
      return list(self.backend.encode(text))
    ids = []
    pattern = "(" + "|".join(re.escape(t) for t in sorted(self._special, key=len,
                                                               reverse=True)) + ")"
    for piece in re.split(pattern, text):
      if piece in self._special:
        ids.append(self._special[piece])
      elif piece:
        ids.extend(self.backend.encode(piece))
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = False) -> str:
    """Text of a 1-D sequence of ids.

    `skip_special_tokens` drops the tokenizer's special tokens: HF added tokens marked special;
    for SentencePiece, control symbols and the BOS/EOS/PAD tokens (a SentencePiece model does
    not record which user-defined symbols are special).
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if self.kind == "hf":
      return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
    control = set(self._special.values())
    if skip_special_tokens:
      skip = control | {self.bos_id, self.eos_id, self.pad_id}
      ids = [i for i in ids if i not in skip]
    # SentencePiece's decode drops control symbols (<s>, </s>); write them out, as `encode` reads
    # them and as the HF backend does without `skip_special_tokens`.
    pieces, run = [], []
    for i in ids:
      if i in control:
        pieces += [self.backend.decode(run), self.backend.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(pieces) + self.backend.decode(run)


def _read_json(path: str) -> dict[str, Any]:
  """The JSON object in `path` ({} if there is no such file); a ValueError naming the file if it
  is not one."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
  return config


def _template_from_config(config: Mapping[str, Any], directory: str) -> str | None:
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):
    # Several named templates: transformers uses the one named "default".
    named = {t["name"]: t["template"] for t in template}
    template = named.get("default")
  return template


def load_tokenizer(path: str, *, chat_template: str | None = None) -> TextTokenizer:
  """Loads a tokenizer from a local directory (or a `tokenizer.json` / `.model` file).

  The directory's `tokenizer_config.json` gives the BOS/EOS/PAD tokens and the chat template
  (or `chat_template.jinja`); a SentencePiece model without one uses the model's own
  BOS/EOS/PAD ids. Nothing is downloaded.

  Args:
    path: directory with `tokenizer.json` or `tokenizer.model`, or the file itself.
    chat_template: a jinja template replacing the one in the directory.

  Returns:
    The `TextTokenizer`.

  Raises:
    ValueError: if no tokenizer file is found.
  """
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isdir(path):
    candidates = [os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")]
    found = [c for c in candidates if os.path.exists(c)]
    if not found:
      raise ValueError(f"no tokenizer.json or tokenizer.model in {path!r}")
    file = found[0]
  elif os.path.exists(path):
    file = path
  else:
    raise ValueError(f"tokenizer path {path!r} does not exist")
  config = _read_json(os.path.join(directory, "tokenizer_config.json"))
  tokens = {name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "pad_token")}
  template = chat_template if chat_template is not None else _template_from_config(
      config, directory)
  if file.endswith(".json"):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      backend = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # The Rust bindings raise a bare Exception; say which file it was.
      raise ValueError(f"{file} is not a valid tokenizers JSON file: {e}") from e
    return TextTokenizer(backend, kind="hf", chat_template=template, **tokens)
  if file.endswith(".model"):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    backend = sentencepiece.SentencePieceProcessor(model_file=file)
    for name, i in (("bos_token", backend.bos_id()), ("eos_token", backend.eos_id()),
                    ("pad_token", backend.pad_id())):
      if tokens[name] is None and i >= 0:
        tokens[name] = backend.id_to_piece(i)
    return TextTokenizer(backend, kind="sentencepiece", chat_template=template, **tokens)
  raise ValueError(f"{file!r} is neither a tokenizer.json nor a SentencePiece .model file")


def check_vocab(tokenizer: TextTokenizer, model_config: Any) -> None:
  """Raises a ValueError if the tokenizer has ids the model cannot embed.

  Args:
    tokenizer: the tokenizer.
    model_config: anything with a `vocab_size` (a `TransformerConfig`), or the size itself.
      A model vocabulary larger than the tokenizer's (padded, as Qwen2.5's) is fine.
  """
  model_vocab = model_config if isinstance(model_config, int) else model_config.vocab_size
  if tokenizer.vocab_size > model_vocab:
    raise ValueError(
        f"tokenizer vocabulary size {tokenizer.vocab_size} exceeds the model's vocab_size "
        f"{model_vocab}: ids >= {model_vocab} would index past the embedding table"
    )


# -- chat formats ------------------------------------------------------------------------------

Messages = Sequence[Mapping[str, str]]


@functools.cache
def _has_transformers() -> bool:
  """Whether transformers imports (a broken install counts as absent)."""
  try:
    import transformers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def resolve_chat_format(tokenizer: TextTokenizer, chat_format: str | None = None) -> str:
  """The chat format to use: `chat_format` if given, else the default described above.

  Raises:
    ValueError: for an unknown format, "template" without a template or transformers, or no
      default available.
  """
  if chat_format is not None:
    if chat_format not in CHAT_FORMATS:
      raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
    if chat_format == "template":
      if tokenizer.chat_template is None:
        raise ValueError("chat_format='template' but the tokenizer has no chat_template")
      if not _has_transformers():
        raise ValueError("chat_format='template' needs the transformers package")
    return chat_format
  if tokenizer.chat_template is not None and _has_transformers():
    return "template"
  for name, fmt in _BUILTIN.items():
    if tokenizer.token_to_id(fmt.end_of_turn) is not None:
      return name
  raise ValueError(
      "no chat format: the tokenizer has no chat_template (or transformers is not installed) and "
      f"none of the built-in formats' tokens; pass chat_format (one of {CHAT_FORMATS})"
  )


def end_of_turn_token(tokenizer: TextTokenizer, chat_format: str | None = None) -> str:
  """The token that closes an assistant turn (the sampler's EOS): built-in or the EOS token."""
  name = resolve_chat_format(tokenizer, chat_format)
  if name in _BUILTIN:
    return _BUILTIN[name].end_of_turn
  if tokenizer.eos_token is None:
    raise ValueError("the tokenizer has no eos_token to close a turn of its chat template")
  return tokenizer.eos_token


def end_of_turn_id(tokenizer: TextTokenizer, chat_format: str | None = None) -> int:
  """Id of `end_of_turn_token`: pass it as `SamplingConfig(eos_id=...)`."""
  token = end_of_turn_token(tokenizer, chat_format)
  i = tokenizer.token_to_id(token)
  if i is None:
    raise ValueError(f"end-of-turn token {token!r} is not in the tokenizer's vocabulary")
  return i


@functools.lru_cache(maxsize=16)
def _transformers_renderer(template: str, bos: str | None, eos: str | None, pad: str | None):
  """A transformers tokenizer that only carries the template and the special-token strings.

  `apply_chat_template(tokenize=False)` only renders text, so an empty vocabulary is enough; the
  `TextTokenizer` then encodes the text itself, identically for both backends.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  carrier = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
  specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad))
              if v is not None}
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=carrier, chat_template=template, **specials)


def _check_messages(messages: Messages | str) -> list[dict[str, str]]:
  if isinstance(messages, str):
    return [{"role": "user", "content": messages}]
  if not isinstance(messages, Sequence) or not messages:
    raise ValueError("messages must be a str or a non-empty list of {'role', 'content'} dicts")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
        m.get("content"), str):
      raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {m!r}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def render_chat(tokenizer: TextTokenizer, messages: Messages | str, *,
                add_generation_prompt: bool, chat_format: str | None = None) -> str:
  """The text of a conversation in the chat format.

  Args:
    tokenizer: supplies the template and special tokens.
    messages: `[{"role": ..., "content": ...}, ...]`, or a str for one user message.
    add_generation_prompt: end with the header that opens the assistant's turn.
    chat_format: see `resolve_chat_format`.

  Returns:
    The rendered text (special tokens as strings).
  """
  messages = _check_messages(messages)
  name = resolve_chat_format(tokenizer, chat_format)
  if name == "template":
    renderer = _transformers_renderer(tokenizer.chat_template, tokenizer.bos_token,
                                      tokenizer.eos_token, tokenizer.pad_token)
    return renderer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  fmt = _BUILTIN[name]
  text = fmt.begin + "".join(
      fmt.message.format(role=m["role"],
                         content=m["content"].strip() if fmt.strip_content else m["content"])
      for m in messages)
  return text + (fmt.generation_prompt if add_generation_prompt else "")


def encode_prompt(tokenizer: TextTokenizer, messages: Messages | str, *,
                  chat_format: str | None = None) -> np.ndarray:
  """Prompt ids (int32 [Tp]) of a conversation, ending with the assistant's turn header."""
  text = render_chat(tokenizer, messages, add_generation_prompt=True, chat_format=chat_format)
  return np.asarray(tokenizer.encode(text), np.int32)


def encode_response(tokenizer: TextTokenizer, messages: Messages | str, response: str, *,
                    chat_format: str | None = None) -> np.ndarray:
  """Response ids (int32 [Tr]) of the assistant answer `response`, end-of-turn included.

  Raises:
    ValueError: if the template renders the conversation with the answer so that it does not
      start with the prompt (the split into prompt and response would be ill-defined).
  """
  if not isinstance(response, str):
    raise ValueError(f"response must be a str, got {type(response).__name__}")
  messages = _check_messages(messages)
  prompt = render_chat(tokenizer, messages, add_generation_prompt=True, chat_format=chat_format)
  full = render_chat(tokenizer, messages + [{"role": "assistant", "content": response}],
                     add_generation_prompt=False, chat_format=chat_format)
  if not full.startswith(prompt):
    raise ValueError(
        "the chat template renders the conversation with the answer without the prompt as its "
        f"prefix, so prompt and response cannot be split:\nprompt: {prompt!r}\nfull: {full!r}"
    )
  ids = tokenizer.encode(full[len(prompt):])
  eot = end_of_turn_id(tokenizer, chat_format)
  if eot in ids:
    ids = ids[:len(ids) - ids[::-1].index(eot)]
  else:
    ids.append(eot)
  return np.asarray(ids, np.int32)


def encode_sft_example(tokenizer: TextTokenizer, messages: Messages | str, response: str, *,
                       chat_format: str | None = None) -> dict[str, np.ndarray]:
  """`{"prompt", "response"}` int32 ids for `rlhfjax.data.sft_batch`."""
  return {
      "prompt": encode_prompt(tokenizer, messages, chat_format=chat_format),
      "response": encode_response(tokenizer, messages, response, chat_format=chat_format),
  }


def encode_preference_example(tokenizer: TextTokenizer, messages: Messages | str, chosen: str,
                              rejected: str, *,
                              chat_format: str | None = None) -> dict[str, np.ndarray]:
  """`{"prompt", "chosen", "rejected"}` int32 ids for `rlhfjax.data.preference_batch`."""
  return {
      "prompt": encode_prompt(tokenizer, messages, chat_format=chat_format),
      "chosen": encode_response(tokenizer, messages, chosen, chat_format=chat_format),
      "rejected": encode_response(tokenizer, messages, rejected, chat_format=chat_format),
  }
