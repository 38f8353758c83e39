"""HF / SentencePiece tokenizers, chat formats and the prompt/response split with masks.

Tokenizers are trained here on a few sentences (nothing is downloaded): a byte-level BPE with the
`tokenizers` package and a byte-fallback BPE with `sentencepiece`, both knowing the Llama-3 and
ChatML special tokens.
"""

import importlib
import io
import json
import os

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from rlhfjax.data import preference_batch, sft_batch  # pylint: disable=wrong-import-position
from rlhfjax.data.tokenizers import (  # pylint: disable=wrong-import-position
    CHAT_FORMATS,
    TextTokenizer,
    check_vocab,
    encode_preference_example,
    encode_prompt,
    encode_sft_example,
    end_of_turn_id,
    load_tokenizer,
    render_chat,
    resolve_chat_format,
)



def _importable(name):
  try:
    importlib.import_module(name)
  except ImportError:
    return False
  return True


requires_transformers = pytest.mark.skipif(not _importable("transformers"),
                                           reason="needs transformers")

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>"]
CORPUS = ["the cat sat on the mat", "hello world, how are you?", "I am fine, thanks!",
          "You are a helpful assistant.", "What is two plus two? It is four."] * 10

# The `chat_template` of meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The plain ChatML template (Qwen2 chat models without the default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "hello world, how are you?"},
    {"role": "assistant", "content": "I am fine, thanks!"},
    {"role": "user", "content": " What is two plus two? "},
]


def _write_hf(directory, config):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<unk>"] + SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A BPE tokenizer with the Llama-3 template; EOS is the end-of-turn token, as in Llama-3."""
  return _write_hf(str(tmp_path_factory.mktemp("hf")), {
      "bos_token": "<|begin_of_text|>",
      "eos_token": {"content": "<|eot_id|>", "special": True},
      "chat_template": LLAMA3_TEMPLATE,
  })


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  """A SentencePiece model (Llama-2 style: <s> and </s> control symbols) with a ChatML template."""
  spm = pytest.importorskip("sentencepiece")
  directory = str(tmp_path_factory.mktemp("sp"))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=330, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, user_defined_symbols=SPECIALS, minloglevel=2)
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(model.getvalue())
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}, f)
  return directory


@pytest.fixture(scope="module", params=["hf", "sentencepiece"])
def tokenizer(request, hf_dir, sp_dir):
  return load_tokenizer(hf_dir if request.param == "hf" else sp_dir)


# -- loading and encoding ------------------------------------------------------------------------


def test_load_hf_tokenizer(hf_dir):
  tok = load_tokenizer(hf_dir)
  assert tok.kind == "hf" and tok.vocab_size == 320
  assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") == 1
  assert tok.eos_id == tok.token_to_id("<|eot_id|>") == 4
  assert tok.pad_id is None and tok.chat_template == LLAMA3_TEMPLATE
  assert load_tokenizer(os.path.join(hf_dir, "tokenizer.json")).vocab_size == 320


def test_load_sentencepiece_tokenizer(sp_dir):
  tok = load_tokenizer(sp_dir)
  assert tok.kind == "sentencepiece" and tok.vocab_size == 330
  # BOS from the model (no bos_token in the config); EOS from tokenizer_config.json.
  assert tok.bos_token == "<s>" and tok.bos_id == 1
  assert tok.eos_token == "<|im_end|>" and tok.eos_id == tok.token_to_id("<|im_end|>")
  # Control symbols in text become their ids (SentencePiece alone would spell them out).
  assert tok.encode("<s>the cat</s>") == [1] + tok.encode("the cat") + [2]


@pytest.mark.parametrize("text", ["the cat sat on the mat", "hello  world,\nhow are you?",
                                  "unseen wörds ünïcode"])
def test_encode_decode_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)
  assert all(0 <= i < tokenizer.vocab_size for i in ids)
  assert tokenizer.decode(ids) == text


def test_special_tokens_in_text_are_single_ids(tokenizer):
  ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
  assert ids[0] == tokenizer.token_to_id("<|im_start|>")
  assert ids[-1] == tokenizer.token_to_id("<|im_end|>")
  assert tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>"


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="does not exist"):
    load_tokenizer(str(tmp_path / "missing.json"))
  bad = _write_hf(str(tmp_path / "bad"), {"eos_token": "<|not_a_token|>"})
  with pytest.raises(ValueError, match="eos_token '<|not_a_token|>' is not in the"):
    load_tokenizer(bad)
  # Malformed files: errors name the file (not a bare JSONDecodeError or Rust exception).
  broken_config = _write_hf(str(tmp_path / "broken_config"), {})
  with open(os.path.join(broken_config, "tokenizer_config.json"), "w") as f:
    f.write('{"bos_token": \n')
  with pytest.raises(ValueError, match="broken_config/tokenizer_config.json is not valid JSON"):
    load_tokenizer(broken_config)
  os.makedirs(tmp_path / "broken_json")
  (tmp_path / "broken_json" / "tokenizer.json").write_text("garbage\n")
  with pytest.raises(ValueError, match="broken_json/tokenizer.json is not a valid tokenizers"):
    load_tokenizer(str(tmp_path / "broken_json"))


@pytest.mark.parametrize("model_vocab, ok", [(319, False), (320, True), (512, True)])
def test_check_vocab(hf_dir, model_vocab, ok):
  from rlhfjax.models import get_config  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer(hf_dir)
  config = get_config("tiny", vocab_size=model_vocab)
  if ok:
    check_vocab(tok, config)
    check_vocab(tok, model_vocab)
  else:
    with pytest.raises(ValueError, match="vocabulary size 320 exceeds the model's vocab_size 319"):
      check_vocab(tok, config)


# -- chat formats --------------------------------------------------------------------------------


@requires_transformers
@pytest.mark.parametrize("builtin, template", [("llama3", LLAMA3_TEMPLATE),
                                               ("chatml", CHATML_TEMPLATE)])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_formats_equal_transformers_rendering(hf_dir, builtin, template,
                                                      add_generation_prompt):
  tok = load_tokenizer(hf_dir, chat_template=template)
  assert resolve_chat_format(tok) == "template"
  expected = render_chat(tok, CONVERSATION, add_generation_prompt=add_generation_prompt)
  got = render_chat(tok, CONVERSATION, add_generation_prompt=add_generation_prompt,
                    chat_format=builtin)
  assert got == expected


def test_builtin_llama3_text():
  """Without transformers the built-in format is the whole story; pin its exact text."""
  tok = TextTokenizer(_tiny_hf_backend(), kind="hf", bos_token="<|begin_of_text|>")
  text = render_chat(tok, "  hi ", add_generation_prompt=True, chat_format="llama3")
  assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n")


def _tiny_hf_backend():
  vocab = {t: i for i, t in enumerate(["<unk>"] + SPECIALS + ["hi"])}
  return tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))


def test_default_format_without_template_is_detected(hf_dir):
  # Without a template the built-in formats are detected from the vocabulary; this one knows both
  # token sets and Llama-3's is tried first.
  tok = TextTokenizer(load_tokenizer(hf_dir).backend, kind="hf")
  assert resolve_chat_format(tok) == "llama3"
  with pytest.raises(ValueError, match="chat_format must be one of"):
    resolve_chat_format(tok, "alpaca")
  with pytest.raises(ValueError, match="has no chat_template"):
    resolve_chat_format(tok, "template")
  plain = TextTokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"<unk>": 0, "a": 1}, unk_token="<unk>")), kind="hf")
  with pytest.raises(ValueError, match="no chat format"):
    resolve_chat_format(plain)
  assert set(CHAT_FORMATS) == {"template", "llama3", "chatml"}


FORMATS = ["llama3", "chatml", pytest.param("template", marks=requires_transformers)]


@pytest.mark.parametrize("chat_format", FORMATS)
def test_sft_example_split_and_masks(tokenizer, chat_format):
  """Prompt outside the loss mask; response = answer + end-of-turn inside it, exactly."""
  answer = "It is four."
  example = encode_sft_example(tokenizer, CONVERSATION, answer, chat_format=chat_format)
  eot = end_of_turn_id(tokenizer, chat_format)
  prompt_text = render_chat(tokenizer, CONVERSATION, add_generation_prompt=True,
                            chat_format=chat_format)
  # The prompt is the rendered conversation up to the assistant header, tokenised.
  np.testing.assert_array_equal(example["prompt"], tokenizer.encode(prompt_text))
  assert example["prompt"].dtype == example["response"].dtype == np.int32
  # The response is the answer and one end-of-turn token, nothing after it (ChatML's "\n").
  assert example["response"][-1] == eot and list(example["response"]).count(eot) == 1
  assert tokenizer.decode(example["response"][:-1]) == answer
  # Earlier assistant turns stay in the prompt, outside the loss.
  assert "I am fine, thanks!" in tokenizer.decode(example["prompt"])

  batch = sft_batch([example], prompt_len=len(example["prompt"]) + 3, response_len=12)
  loss_mask = batch["loss_mask"][0].astype(bool)
  np.testing.assert_array_equal(batch["tokens"][0][loss_mask], example["response"])
  real = batch["attention_mask"][0].astype(bool)
  np.testing.assert_array_equal(batch["tokens"][0][real & ~loss_mask], example["prompt"])


@requires_transformers
def test_template_and_builtin_give_the_same_ids(hf_dir):
  tok = load_tokenizer(hf_dir)  # carries the Llama-3 template
  a = encode_sft_example(tok, CONVERSATION, "It is four.", chat_format="template")
  b = encode_sft_example(tok, CONVERSATION, "It is four.", chat_format="llama3")
  for key in ("prompt", "response"):
    np.testing.assert_array_equal(a[key], b[key])


@requires_transformers
def test_eos_is_appended_when_the_template_writes_none(hf_dir):
  template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
  tok = load_tokenizer(hf_dir, chat_template=template)
  example = encode_sft_example(tok, "hello world", "I am fine")
  assert tok.decode(example["prompt"]) == "user: hello world\nassistant: "
  # The template ends the answer with "\n" and no end token: EOS (here <|eot_id|>) is appended.
  assert example["response"][-1] == tok.eos_id
  assert tok.decode(example["response"][:-1]) == "I am fine\n"


@requires_transformers
def test_template_that_does_not_extend_the_prompt_is_rejected(hf_dir):
  # The generation prompt "<gen>" is not what the answer's turn starts with ("[assistant] "), so
  # the conversation with the answer does not extend the prompt.
  template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}<gen>{% endif %}")
  tok = load_tokenizer(hf_dir, chat_template=template)
  with pytest.raises(ValueError, match="cannot be split"):
    encode_sft_example(tok, "hi", "there")


@pytest.mark.parametrize("chat_format", ["llama3", "chatml"])
def test_preference_example_and_batch(tokenizer, chat_format):
  example = encode_preference_example(tokenizer, "What is two plus two?", "It is four.",
                                      "It is five.", chat_format=chat_format)
  np.testing.assert_array_equal(
      example["prompt"], encode_prompt(tokenizer, "What is two plus two?",
                                       chat_format=chat_format))
  batch = preference_batch([example, example], prompt_len=32, response_len=10)
  for side, text in (("chosen", "It is four."), ("rejected", "It is five.")):
    mask = batch[f"{side}_loss_mask"][0].astype(bool)
    np.testing.assert_array_equal(batch[f"{side}_tokens"][0][mask], example[side])
    assert tokenizer.decode(example[side][:-1]) == text
    assert example[side][-1] == end_of_turn_id(tokenizer, chat_format)
  np.testing.assert_array_equal(batch["chosen_tokens"][:, :32], batch["rejected_tokens"][:, :32])


@pytest.mark.parametrize("messages, response, message", [
    ([], "x", "non-empty list"),
    ([{"role": "user"}], "x", "message 0 must be a dict"),
    ("hi", 3, "response must be a str"),
])
def test_bad_chat_inputs(tokenizer, messages, response, message):
  with pytest.raises(ValueError, match=message):
    encode_sft_example(tokenizer, messages, response, chat_format="chatml")


def test_encode_ignores_the_tokenizer_post_processor(hf_dir, tmp_path):
  """A Llama-3 tokenizer.json prepends BOS in its post-processor; the chat format writes BOS
  itself, so encode must not add a second one."""
  backend = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
  bos = backend.token_to_id("<|begin_of_text|>")
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
  directory = tmp_path / "with_post_processor"
  directory.mkdir()
  backend.save(str(directory / "tokenizer.json"))
  with open(os.path.join(hf_dir, "tokenizer_config.json"), encoding="utf-8") as f:
    (directory / "tokenizer_config.json").write_text(f.read(), encoding="utf-8")
  assert backend.encode("hello world").ids[0] == bos  # the post-processor is active
  tok, plain = load_tokenizer(str(directory)), load_tokenizer(hf_dir)
  assert tok.encode("hello world") == plain.encode("hello world")
  prompt = encode_prompt(tok, "hello world", chat_format="llama3")
  assert prompt[0] == bos and list(prompt).count(bos) == 1


def test_decode_can_skip_the_special_tokens(tokenizer):
  """decode keeps BOS/EOS (SentencePiece control symbols too) unless told to skip them."""
  text = tokenizer.bos_token + "hello world" + tokenizer.eos_token
  ids = tokenizer.encode(text)
  assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids, skip_special_tokens=True) == "hello world"


def test_the_default_of_several_named_chat_templates_is_used(tmp_path):
  directory = _write_hf(str(tmp_path / "named"), {"chat_template": [
      {"name": "tool_use", "template": CHATML_TEMPLATE},
      {"name": "default", "template": LLAMA3_TEMPLATE}]})
  assert load_tokenizer(directory).chat_template == LLAMA3_TEMPLATE


def test_a_str_message_is_one_user_message_with_its_content_unchanged(tokenizer):
  # ChatML keeps the content's whitespace: a str prompt must keep it too.
  for chat_format in ("chatml", "llama3"):
    as_str = render_chat(tokenizer, " hi there ", add_generation_prompt=True,
                         chat_format=chat_format)
    as_list = render_chat(tokenizer, [{"role": "user", "content": " hi there "}],
                          add_generation_prompt=True, chat_format=chat_format)
    assert as_str == as_list


def test_hf_vocab_size_counts_added_tokens():
  """Llama-3's special tokens are added tokens past the base vocabulary: ids the model embeds."""
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1},
                                                             unk_token="<unk>"))
  backend.add_special_tokens(["<|eot_id|>", "<|begin_of_text|>"])  # ids 2 and 3
  tok = TextTokenizer(backend, kind="hf", eos_token="<|eot_id|>")
  assert tok.vocab_size == 4 and tok.eos_id == 2
  with pytest.raises(ValueError, match="exceeds the model's vocab_size 3"):
    check_vocab(tok, 3)


def test_sentencepiece_unknown_token_has_no_id(sp_dir):
  tok = load_tokenizer(sp_dir)
  unk = tok.backend.unk_id()
  assert tok.token_to_id(tok.backend.id_to_piece(unk)) == unk  # <unk> itself is a token
  assert tok.token_to_id("<|not_a_token|>") is None
  with pytest.raises(ValueError, match="pad_token '<|not_a_token|>' is not in the"):
    TextTokenizer(tok.backend, kind="sentencepiece", pad_token="<|not_a_token|>")
