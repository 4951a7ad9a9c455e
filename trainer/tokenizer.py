# The one way a saved Hugging Face tokenizer is loaded: data=text's data.tokenizer, and commands.prepare's
# --tokenizer. No torch here (prepare needs none); transformers is imported only when a tokenizer is asked for.
from pathlib import Path


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
