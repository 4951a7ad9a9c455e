# What this machine can actually do, measured once and cached for the time model and MFU (trainer/speed/):
#   python -m commands.calibrate [launcher.nproc_per_node=N] [trainer.device=cpu|cuda] [--force]
# N processes at once, one per device (the cores of a CPU shared as N workers share them): matmul throughput per
# dtype at three sizes, memory bandwidth, the cost of an operator, and the latency and bandwidth of all-reduce,
# all-gather, reduce-scatter and send/recv at every group size that divides N. About a minute; `plan` and `tune`
# run it themselves where the cache has no calibration for their device and world size.
import sys

from commands.cli import Parser
from launcher.compose import compose_config
from launcher.elastic import check_gpus, resolve_nproc
from launcher.errors import command_errors
from trainer.dist import device_type
from trainer.speed import calibration
from trainer.speed.calibrate import calibrate


def describe(record: dict) -> str:
    k = record["key"]
    lines = [
        f"shardlab calibrate: {k['device']} x {k['count']}, "
        + (f"{k['threads']} thread(s) per process, " if k["threads"] else "")
        + f"torch {k['torch']} ({record['measured_at']})",
        "  matmul TFLOP/s per rank   "
        + "; ".join(
            f"{d} " + ", ".join(f"{n}: {r:.4g}" for n, r in rates.items())
            for d, rates in record["matmul_tflops"].items()
        ),
        f"  memory bandwidth          {record['copy_gbps']:.3g} GB/s per rank (copy, read + write)",
        f"  operator cost             {record['op_latency_us']:.3g} us beyond its arithmetic",
        "  attention TFLOP/s         "
        + ", ".join(f"{d} {r:.4g}" for d, r in record.get("attention_tflops", {}).items()),
    ]
    if record.get("layout_overhead_s"):
        lines.append("  layout overhead           " + ", ".join(
            f"{name} {s * 1e3:.3g} ms" for name, s in record["layout_overhead_s"].items()) + " per block (pp: stage) and micro-batch")  # fmt: skip
    for size, kinds in record.get("collectives", {}).items():
        for kind, v in kinds.items():
            alpha, beta = v["fit"]
            bw = f"{1 / beta / 1e9:.3g} GB/s" if beta else "n/a"
            lines.append(f"  {kind:14s} group {size:>3s}  latency {alpha * 1e6:8.1f} us, bandwidth {bw}")
    lines.append(f"  cached in {calibration.path_of(k)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="python -m commands.calibrate", description="measure this machine's rates for the time model "
                "and MFU, and cache them (key=value overrides: launcher.nproc_per_node, trainer.device)")  # fmt: skip
    ap.add_argument("--force", action="store_true", help="measure again even where a calibration is cached")
    ap.add_argument("--debug", action="store_true", help="a traceback instead of one line on bad input")
    opts, overrides = ap.parse_with_overrides(list(sys.argv[1:] if argv is None else argv))
    with command_errors(opts.debug):
        cfg = compose_config(overrides)
        device = device_type(cfg.trainer.device)
        world = resolve_nproc(str(cfg.launcher.nproc_per_node), cfg.trainer.device)
        check_gpus(world, cfg.trainer.device)  # the launcher's own check: no more ranks than GPUs
    record = None if opts.force else calibration.load(device, world)
    if record is None or "collectives" not in record:
        print(f"shardlab: calibrating {device} x {world} (about a minute)...", flush=True)
        record = calibrate(device, world)
    print(describe(record), flush=True)


if __name__ == "__main__":
    main()
