# train.py with tests/dist_helpers.raise_at_step, for a real torchrun job (launch style 1) in which one rank
# fails mid-run. From the repo root, with it on PYTHONPATH:
#   torchrun --nproc_per_node=2 tests/failing_train.py <rank> <step> key=value ...
import runpy
import sys
from pathlib import Path

from tests.helpers.dist import raise_at_step

if __name__ == "__main__":
    raise_at_step(int(sys.argv[1]), int(sys.argv[2]))
    train = str(Path(__file__).resolve().parent.parent / "train.py")
    sys.argv = [train, *sys.argv[3:]]
    runpy.run_path(train, run_name="__main__")
