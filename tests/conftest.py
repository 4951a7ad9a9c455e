# Fixtures only; the helpers the tests share live in tests/helpers/.
import os
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.tokenizer import build_tokenizer
from tests.helpers.wandb import wandb_env

# Calibrations and matmul probes (trainer/speed/calibration.py) go to a cache of this test run's own, shared by its
# xdist workers and the processes they start, never the developer's ~/.cache/shardlab.
os.environ.setdefault(
    "SHARDLAB_CACHE_DIR",
    str(
        Path(tempfile.gettempdir())
        / "shardlab-test-cache"
        / os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
    ),
)


@pytest.fixture
def one_thread():
    # In-process runs: one thread, as the CLI's OMP_NUM_THREADS=1 (tests/helpers/cli.py): 2 cores shared
    # with other jobs, where OpenMP threads spinning against each other make a step 10-100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    # wandb must never reach the network or write outside tmp_path.
    for var, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    # A few real text files (copies, so nothing edits them mid-test), 200 KB: quick to read, enough to learn.
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("os.py", "functools.py", "textwrap.py"):
        (root / name).write_bytes((stdlib / name).read_bytes())
    (root / "notes.txt").write_text("not python " * 50)
    return root


@pytest.fixture(scope="session")
def prepared_tokens(tmp_path_factory, text_corpus) -> Path:
    # The corpus's .py files as commands.prepare writes them: byte-level tokens, one file held out.
    from commands.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "bytes"
    prepare(str(text_corpus), str(out), glob="*.py", val_fraction=0.34, num_proc=1)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, text_corpus) -> Path:
    # A local Hugging Face tokenizer (byte-level BPE, 320 tokens with <eos>) trained on the corpus.
    texts = [p.read_text() for p in sorted(text_corpus.iterdir())]
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"), texts)
