# wandb in tests: an environment that never reaches the network or writes outside a test's own dir, and a
# reader of what wandb wrote offline, so tests can check a run's metrics without a server (wandb 0.31 ships
# no Python reader for its .wandb files).
import json
import struct
from pathlib import Path

_DIRS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")


def wandb_env(home: Path | None = None) -> dict[str, str]:
    # Offline and silent; with home, every directory wandb writes to lies under it (and no API key applies:
    # the caller drops WANDB_API_KEY, see conftest's wandb_offline).
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if home is not None:
        env.update({var: str(Path(home) / "wandb-home" / var.lower()) for var in _DIRS}, WANDB_CONSOLE="off")
    return env


def wandb_records(path: Path):
    # The .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB
    # blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    # 4 last) around a serialised `Record` protobuf.
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or kind == 0:  # block trailer padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_run(path: Path) -> dict:
    # -> {"run": the Run record, "config": {key: value}, "history": {step: {key: value}}, "summary": {...}}
    history, summary, run = {}, {}, None
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "history":
            history[rec.history.step.num] = {item_key(i): json.loads(i.value_json) for i in rec.history.item}
        elif kind == "summary":
            summary.update({item_key(i): json.loads(i.value_json) for i in rec.summary.update})
    config = {item_key(i): json.loads(i.value_json) for i in run.config.update} if run is not None else {}
    return {"run": run, "config": config, "history": history, "summary": summary}
