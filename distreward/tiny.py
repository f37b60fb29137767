"""The embedded offline model: a character-level tokenizer with whole-word tokens for the embedded task's phrasings,
and a tiny Llama policy, built in seconds.

They stand in for ``HuggingFaceTB/SmolLM2-135M-Instruct`` where there is no hub. The tokenizer
copies SmolLM2's conventions that matter downstream: a ChatML chat template, ``<|im_start|>`` as
BOS and ``<|im_end|>`` as both EOS and PAD (so the last real token of a padded row must be found
from the attention mask, never from the first pad id).
"""
import string

from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<unk>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLE_TOKENS = ("user", "assistant")
# The words of task v2's phrasings (distreward.testbed.PHRASINGS), one token each as a real BPE has them: with their
# leading space where they follow one, bare (and matched as whole words only) where a prompt can start with them.
# Names, digits, the letters of a count string and everything else stay characters.
SPACED_WORDS = ("has", "gets", "more", "How", "many", "apples", "coins", "pens", "cards", "shells", "these", "digits",
                "in", "order", "the", "letter", "of", "lucky", "digit", "for", "needs", "suits")
SENTENCE_WORDS = ("Sort", "Put", "Count", "Number", "Pick", "Choose", "Which", "How")
CHARACTERS = string.printable  # digits, letters, punctuation, space and \t\n\r\x0b\x0c


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one id per printable ASCII character) with word tokens and a chat template.

    It is a BPE model with no merges, so it splits text into characters and maps anything else
    to ``<unk>``; ``decode`` concatenates tokens back without spaces. Added tokens, as SmolLM2's BPE has them as
    words: the chat roles ``user`` and ``assistant`` (the template costs 8 tokens per exchange, not 22) and the
    words of task v2's phrasings (:data:`SPACED_WORDS`, :data:`SENTENCE_WORDS`), so a templated task v2 example is
    27 tokens on average, not 40 (every stage's forward is that much cheaper). 135 ids.
    """
    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(CHARACTERS)))}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_tokens(list(ROLE_TOKENS))
    tokenizer.add_tokens([AddedToken(" " + word, normalized=False) for word in SPACED_WORDS]
                         + [AddedToken(word, single_word=True, normalized=False) for word in SENTENCE_WORDS])
    return tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 128, num_layers: int = 4,
                      num_heads: int = 4, max_positions: int = 256) -> LlamaConfig:
    """A small ``LlamaConfig`` sized to ``tokenizer``'s vocabulary (tied input/output embeddings)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_policy(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A randomly initialised tiny ``LlamaForCausalLM`` (fp32, ~0.8M parameters), deterministic by ``seed``.

    ``config_overrides`` go to :func:`tiny_llama_config` (``hidden_size``, ``num_layers``, ...).
    """
    import torch

    config = tiny_llama_config(tokenizer, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
