# From your data to a model you can use: a checkpoint keeps its own copy of the run's tokenizer, so export
# depends on nothing outside the run (the data directory may move); the export carries the data's special token
# ids and a generation config, and a byte-level tokenizer where the run was on bytes, so that transformers'
# pipeline stops at the data's EOS and decodes a prompt back exactly; `commands.sample` (greedy) writes what
# transformers' greedy generate writes on the export, token for token; eval.samples prints and keeps samples.
import json
import os
import shutil
import stat

import pytest
import torch
from omegaconf import OmegaConf

from commands import sample as sample_cli
from commands.export import export
from commands.prepare import prepare
from models.generate import generate
from tests.helpers.run import compose_config, train_in_process

pytestmark = pytest.mark.slow

UMASK = os.umask(0o022)
os.umask(UMASK)
SHARED = 0o666 & ~UMASK  # the mode a new file gets from this process's umask
RUN = ("checkpoint=periodic", "checkpoint.every_n_steps=4", "trainer.max_steps=4", "eval.at_end=false")


class EOSHead(torch.nn.Module):
    # An output head that always makes the data's EOS the likeliest token: generation must stop at once.
    def __init__(self, vocab: int, eos: int):
        super().__init__()
        self.vocab, self.eos = vocab, eos

    def forward(self, h):
        logits = torch.zeros(*h.shape[:-1], self.vocab, dtype=h.dtype)
        logits[..., self.eos] = 100.0
        return logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_corpus, tokenizer_dir):
    # Two runs on prepared tokens: bytes, and the BPE tokenizer (its data directory then moved away: the
    # checkpoint's own copy of the tokenizer is what export reads). model.vocab_size unset: meta.json's.
    root = tmp_path_factory.mktemp("generate")
    prepare(str(text_corpus), str(root / "bytes"), glob="*.py", val_fraction=0.34, num_proc=1)
    prepare(
        str(text_corpus), str(root / "bpe"), str(tokenizer_dir), glob="*.py", val_fraction=0.34, num_proc=1
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("bytes", "bpe"):
            cfg = compose_config("data=tokens", f"data.path={root / name}", *RUN)
            train_in_process(cfg, root / f"run-{name}")
    finally:
        torch.set_num_threads(threads)
    shutil.move(root / "bpe", root / "bpe-moved")
    return root


def test_a_checkpoint_keeps_the_tokenizer_and_takes_the_vocabulary_from_meta_json(runs):
    ckpt = runs / "run-bpe" / "checkpoints" / "step_00000004"
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    digests = json.loads((ckpt / "digests.json").read_text())["files"]
    assert "tokenizer/tokenizer.json" in digests  # verified with the rest
    meta = json.loads((runs / "bpe-moved" / "meta.json").read_text())
    for name, vocab in (("bpe", meta["vocab_size"]), ("bytes", 256)):
        assert OmegaConf.load(runs / f"run-{name}" / "config.yaml").model.vocab_size == vocab


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_the_export_generates_in_a_transformers_pipeline_and_stops_at_the_datas_eos(runs, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    out = export(str(runs / f"run-{name}"), str(tmp_path / "hf"))  # a run directory: its newest checkpoint
    tokenizer = AutoTokenizer.from_pretrained(out)
    eos = 0 if name == "bytes" else tokenizer.convert_tokens_to_ids("<eos>")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id == eos
    assert (
        not {"local_files_only", "is_local"} & json.loads((out / "tokenizer_config.json").read_text()).keys()
    )
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == SHARED  # the umask's, not 0600
    prompt = "def café(x):\n    return 'naïve' + x  # ✓"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    if name == "bytes":
        assert ids == list(prompt.encode())  # token ids are the UTF-8 bytes, as the run trained on
    model = AutoModelForCausalLM.from_pretrained(out)
    model.lm_head = EOSHead(config["vocab_size"], eos)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    tokens = generator(prompt, max_new_tokens=10, do_sample=False, return_tensors=True)[0][
        "generated_token_ids"
    ]
    assert list(tokens) == [*ids, eos]  # one token, the EOS, and no more
    assert generator(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"] == prompt


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_greedy_sampling_writes_what_transformers_greedy_generate_writes(runs, tmp_path, name, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = runs / f"run-{name}" / "checkpoints" / "step_00000004"
    out = export(str(ckpt), str(tmp_path / "hf"))
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    prompt = "import os\n"
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
    model, ours_tokenizer, args, _ = sample_cli.load(str(ckpt), "cpu")
    ours = generate(model, ids, 24, args.max_seq_len, eos_id=ours_tokenizer.eos_token_id)[0].tolist()
    assert ours == theirs
    capsys.readouterr()
    argv = [str(ckpt), "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0"]
    assert sample_cli.main(argv) == 0
    new = theirs[ids.shape[1] :]
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    assert (
        capsys.readouterr().out == tokenizer.decode([*ids[0].tolist(), *new], skip_special_tokens=True) + "\n"
    )


def test_sampling_with_temperature_is_seeded_and_refuses_bad_options(runs, capsys):
    ckpt = str(runs / "run-bytes")
    args = [
        ckpt,
        "--prompt",
        "x",
        "--max-new-tokens",
        "16",
        "--temperature",
        "1.0",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
    ]
    texts = []
    for seed in ("1", "1", "2"):
        capsys.readouterr()
        assert sample_cli.main([*args, "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]
    with pytest.raises(SystemExit) as exit_:
        sample_cli.main([ckpt, "--top-p", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "shardlab: error: --top-p must be in (0, 1], got 0.0"


def test_eval_samples_are_printed_and_kept(tmp_path, capsys, one_thread, text_corpus):
    cfg = compose_config("data=text", f"data.path={text_corpus}", "trainer.max_steps=2", "eval.every_n_steps=1",
                         "eval.samples=2", "eval.sample_tokens=5")  # fmt: skip
    train_in_process(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 2, 2]
    assert all(len(r["prompt"].encode()) == 16 and len(r["continuation"].encode()) <= 5 * 4 for r in rows)
    out = capsys.readouterr().out
    assert f"shardlab: sample 1 at step 2: {rows[2]['prompt']!r} -> {rows[2]['continuation']!r}" in out
    assert stat.S_IMODE((tmp_path / "run" / "summary.json").stat().st_mode) == SHARED
