# Integrity of what shardlab writes and reads back: every checkpoint records a digest of each file it wrote, and a
# changed byte (the size unchanged) is refused naming the file; checkpoint.resume=auto falls back to the newest
# checkpoint that verifies and says so; a checkpoint from before digests loads with one warning. Prepared token
# files carry their digests and largest id in meta.json, checked before any worker starts, as is a meta.json
# edited so that it no longer matches its files. (Each refusal as the CLI prints it: tests/test_bad_input.py.)
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.run import compose_config, train_in_process
from trainer import checkpoint_io, integrity
from trainer.checks import validate


def flip_byte(path: Path, at: float = 0.5) -> None:
    # One byte inverted in place: the size is unchanged, so only a digest can tell.
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    # A run with checkpoints at steps 2 and 4.
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    cfg = compose_config(
        "checkpoint=periodic", "checkpoint.every_n_steps=2", "trainer.max_steps=4", "eval.at_end=false"
    )
    train_in_process(cfg, run_dir)
    return run_dir


def test_a_save_records_every_file_it_wrote(saved):
    ckpt = saved / "checkpoints" / "step_00000004"
    recorded = integrity.read_manifest(ckpt)
    files = sorted(p.name for p in ckpt.iterdir() if p.name != integrity.MANIFEST)
    assert sorted(recorded) == files and ".metadata" in files and "__0_0.distcp" in files
    assert all(recorded[f]["bytes"] == (ckpt / f).stat().st_size for f in files)
    assert integrity.mismatch(ckpt, recorded) is None


def test_a_flipped_byte_is_refused_and_auto_resume_falls_back(saved, tmp_path, capsys, one_thread):
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    newest = run_dir / "checkpoints" / "step_00000004"
    flip_byte(newest / "__0_0.distcp")
    with pytest.raises(checkpoint_io.CheckpointError) as info:
        checkpoint_io.verify(newest)
    assert str(info.value) == (
        f"checkpoint {newest} fails verification: __0_0.distcp does not match the digest recorded when it was "
        "written (its bytes changed since): delete it, or set checkpoint.resume to an older checkpoint directory or none"
    )
    # Named, it is refused before any worker starts; auto passes it over for step 2 and says so, in one line.
    with pytest.raises(ValueError, match="fails verification: __0_0.distcp"):
        validate(
            compose_config("checkpoint=periodic", f"checkpoint.resume={newest}", "trainer.max_steps=6"),
            1,
            "cpu",
        )
    cfg = compose_config(
        "checkpoint=periodic", "checkpoint.every_n_steps=2", "trainer.max_steps=6", "eval.at_end=false"
    )
    cfg.run_dir = str(run_dir)
    validate(cfg, 1, "cpu")  # checkpoint.resume=auto: the fallback is no reason to refuse
    summary = train_in_process(cfg, run_dir)
    older = run_dir / "checkpoints" / "step_00000002"
    out = capsys.readouterr().out
    assert (
        f"shardlab: checkpoint.resume=auto: checkpoint {newest} fails verification: __0_0.distcp does not match the "
        f"digest recorded when it was written (its bytes changed since); resuming from {older}, the newest that verifies"
    ) in out.splitlines()
    assert summary.resumed_from == str(older) and summary.status == "ok"
    checkpoint_io.verify(newest)  # saved again by the resumed run, whole
    # Every checkpoint failing is refused: resuming none of them would silently start over.
    for step in (2, 4, 6):
        flip_byte(run_dir / "checkpoints" / f"step_0000000{step}" / ".metadata", at=0.9)
    with pytest.raises(ValueError, match=r"no checkpoint under .* verifies: checkpoint .*step_00000006 fails "
                       r"verification: \.metadata does not match .* \(and 2 more\): delete them, or set "
                       r"checkpoint\.resume=none"):  # fmt: skip
        validate(cfg, 1, "cpu")


def test_a_checkpoint_from_before_digests_loads_with_one_warning(saved, tmp_path, capsys):
    old = tmp_path / "step_00000002"
    shutil.copytree(saved / "checkpoints" / "step_00000002", old)
    (old / integrity.MANIFEST).unlink()
    checkpoint_io.verify(old)
    checkpoint_io.verify(old)  # once per process
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"shardlab: warning: checkpoint {old} records no digests (saved before shardlab recorded them): loading it "
        "unverified"
    ]
    assert checkpoint_io.read_train_state(old)["step"] == 2


def test_token_files_and_their_meta_are_checked_before_any_worker_starts(prepared_tokens, tmp_path, capsys):
    meta = json.loads((prepared_tokens / "meta.json").read_text())
    assert sorted(meta["files"]) == ["train.bin", "val.bin"] and meta["digest"] == "xxh3_128"
    assert 0 < meta["max_token_id"] < meta["vocab_size"]

    def copy(name: str, edit=None) -> Path:
        out = tmp_path / name
        shutil.copytree(prepared_tokens, out)
        if edit is not None:
            m = json.loads((out / "meta.json").read_text())
            edit(m)
            (out / "meta.json").write_text(json.dumps(m))
        return out

    def check(path: Path, *overrides: str):
        cfg = compose_config("data=tokens", f"data.path={path}", "eval.at_end=false", *overrides)
        return validate(cfg, 1, "cpu")

    flipped = copy("flipped")
    flip_byte(flipped / "train.bin")
    with pytest.raises(
        ValueError, match=f"{flipped / 'train.bin'} does not match the digest meta.json records"
    ):
        check(flipped)
    check(flipped, "data.verify=false")  # sizes only, as asked
    lowered = copy("lowered", lambda m: m.update(max_token_id=m["max_token_id"] - 1))
    with pytest.raises(ValueError, match=r"holds token id \d+, above the largest \(\d+\) meta.json records"):
        check(lowered)
    small = copy("small", lambda m: m.update(vocab_size=m["max_token_id"]))
    with pytest.raises(
        ValueError, match=r"records token ids up to \d+ but a vocabulary of \d+: it no longer matches"
    ):
        check(small, f"model.vocab_size={meta['max_token_id']}")
    old = copy("old", lambda m: m.pop("files"))
    capsys.readouterr()
    check(old)
    assert capsys.readouterr().err.strip() == (
        f"shardlab: warning: {old / 'meta.json'} records no digests (prepared before shardlab recorded them): its "
        f"token files are checked by size only; prepare {old} again to have them verified"
    )
