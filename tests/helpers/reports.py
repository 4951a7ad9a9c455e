# What a sweep report holds (tests/test_sweep.py, tests/test_sweep_parts.py).
import csv
import struct
from pathlib import Path


def csv_rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def md_rows(sweep_dir: Path) -> list[str]:
    lines = (sweep_dir / "report.md").read_text().splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith("| #")]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)
