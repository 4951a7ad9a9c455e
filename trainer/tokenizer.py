# Tokenizers: the one way a saved Hugging Face tokenizer is loaded (data=text's data.tokenizer, commands.prepare's
# --tokenizer), the one way one is saved (for a run's checkpoints and exports), and the byte-level tokenizer of a
# model trained on bytes, so that an export of one works in transformers' pipeline as any other does. No torch here
# (prepare needs none); transformers and tokenizers are imported only when a tokenizer is asked for.
import json
from pathlib import Path

BYTE_EOS = 0  # byte-level documents are separated by a NUL byte, which text does not hold
# What transformers writes into tokenizer_config.json from how a tokenizer was loaded, not what it is: an export
# that carries them tells its users' from_pretrained never to look beyond the disk.
LOAD_FLAGS = ("local_files_only", "is_local")


def load_tokenizer(path: str, option: str = "data.tokenizer", for_bytes: str = "data.tokenizer=null"):
    # A saved Hugging Face tokenizer from a local directory (nothing is downloaded at run time). option: the
    # setting that named it, and for_bytes what to set instead for byte-level tokens, for the message.
    from transformers import AutoTokenizer

    fix = f"give the directory of a saved Hugging Face tokenizer (tokenizer.json), or {for_bytes} for bytes"
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"{option} {path} is not a local directory: {fix}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{option} {path} is not a tokenizer directory ({type(e).__name__}: {first}): {fix}"
        ) from None


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out)
    config = Path(out) / "tokenizer_config.json"
    if config.is_file():
        fields = json.loads(config.read_text())
        config.write_text(
            json.dumps({k: v for k, v in fields.items() if k not in LOAD_FLAGS}, indent=2) + "\n"
        )


def byte_to_char() -> dict[int, str]:
    # The byte-level alphabet GPT-2 introduced and `tokenizers`' ByteLevel uses: each byte as a printable character
    # (the printable ones as themselves, the rest shifted past 255), so that a vocabulary of strings covers bytes.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shift)
            shift += 1
    return chars


def byte_tokenizer():
    # A Hugging Face tokenizer whose ids are bytes: 256 tokens, token b the byte b, the EOS that prepare separates
    # documents with (the NUL byte, as a special token "\0": text never holds one, and decoding gives the byte).
    # Encoding is UTF-8; decoding gives back the same bytes, so a prompt decodes to itself.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = byte_to_char()
    vocab = {chars[b]: b for b in range(256) if b != BYTE_EOS} | {"\0": BYTE_EOS}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="\0", model_max_length=10**30)
