# The bad-input table of every command, one case per row: each bad input gives one clear line and exit code 2,
# before any worker starts or any file is written, and damages nothing already saved (the checkpoints and inputs
# the rows point at are hashed before and after). train.py: the distinct ways a bad input reaches the user run
# through the real CLI (Hydra's composition errors, the output dir checked before Hydra, the launcher's GPU count,
# one of validate()'s checks), every other row is one of validate()'s checks, which the CLI reports the same way,
# and is checked in-process. The other commands (prepare, export, plan, tune, sbatch, report): each row calls the
# command's main() in-process, as `python -m` does, with its own empty directory for what it would write.
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from commands import calibrate, export, k8s, plan, sample, sbatch, tune
from commands import prepare as prepare_cli
from commands.prepare import prepare
from launcher import report
from launcher.errors import describe_error
from tests.helpers.cli import cli_args, cli_env, finish, start
from tests.helpers.run import REPO, compose_config, train_in_process
from trainer.checks import validate

pytestmark = pytest.mark.slow

# row: (overrides, run dir or None for <tmp>/run, what the message must name[, environment variables to add]).
# {tmp}: the row's own tmp dir,
# {ckpt}: a directory of checkpoints made by the fixture, {file}: a regular file.
CLI_ROWS = {
    # Composition errors, which Hydra would report over several lines (launcher/errors.py condenses them).
    "unknown_option": (
        ["model=nope"],
        None,
        ["model=nope is not an option of model", "choose one of debug, gpt2_124m, gpt2_debug", "llama_20m"],
    ),
    "unknown_key": (
        ["trainer.max_stepz=3"],
        None,
        ["trainer.max_stepz is not a key of trainer", "max_steps"],
    ),
    "wrong_type": (["trainer.max_steps=abc"], None, ["trainer.max_steps=abc", "'abc'", "Integer"]),
    "bad_syntax": (["trainer.max_steps=[1"], None, ["cannot parse the override 'trainer.max_steps=[1'"]),
    # Checked before Hydra makes the run dir, and by the launcher before it validates.
    "output_dir": ([], "{file}/run", ["hydra.run.dir={file}/run", "{file} is a file, not a directory"]),
    # A run directory that even root cannot make (a special filesystem): tried, not guessed from permissions.
    "output_dir_proc": ([], "/proc/shardlab-run", ["hydra.run.dir=/proc/shardlab-run cannot be created",
                                                   "a directory cannot be made in /proc"]),
    "nproc_gpus": (
        ["strategy=ddp", "launcher.nproc_per_node=2", "trainer.device=cuda"],
        None,
        ["launcher.nproc_per_node=2", "no GPU is present (0 GPUs)"],
    ),
    # One of validate()'s checks through the CLI: every row of CHECK_ROWS is reported this way.
    "kv_heads": (["attention.n_kv_heads=3"], None, ["model.n_heads (4)", "K/V head count (3"]),
    # An option of another strategy: Hydra's composition error, condensed.
    "tp_on_ddp": (["strategy=ddp", "strategy.tp=2"], None, ["strategy.tp is not a key of strategy", "bucket_cap_mb"]),
    # A pipeline schedule torch does not have, through the CLI on 2 ranks.
    "pp_schedule": (["strategy=pp", "strategy.pp_schedule=pipedream", "launcher.nproc_per_node=2"], None,
                    ["unknown strategy.pp_schedule 'pipedream'", "gpipe, 1f1b, interleaved_1f1b"]),
    # A pod whose operator's variables contradict the config (trainer/environments.py), before any worker starts.
    "pod_nproc": (
        ["launcher.nproc_per_node=4"],
        None,
        ["launcher.nproc_per_node=4, but the pod's PET_NPROC_PER_NODE=2"],
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "WORLD_SIZE": "4", "RANK": "0", "PET_NNODES": "2",
         "PET_NODE_RANK": "0", "PET_NPROC_PER_NODE": "2"},
    ),
}  # fmt: skip

CHECK_ROWS = {
    "added_key": (["+trainer.max_step=3"], 1, ["trainer.max_step is not a key of trainer", "max_steps"]),
    "dim_heads": (["model.n_heads=3"], 1, ["model.dim (128)", "model.n_heads (3)"]),
    "seq_len": (["trainer.seq_len=1024"], 1, ["trainer.seq_len (1024)", "model.max_seq_len = 512"]),
    # No GPU here: trainer.device=cuda is what this machine cannot run (the fp8 capability rule for a GPU
    # older than 8.9 is checked below, as if on an A100).
    "precision": (["precision=fp8", "trainer.device=cuda"], 1, ["trainer.device=cuda", "no CUDA GPU"]),
    "hsdp_shard": (
        ["strategy=hsdp", "strategy.shard_size=3", "trainer.global_batch_size=4"],
        2,
        ["strategy.shard_size=3", "does not divide the world size 2"],
    ),
    "static_graph_accum": (
        [
            "strategy=ddp",
            "strategy.static_graph=true",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=1",
        ],
        2,
        ["strategy.static_graph=true", "gradient accumulation (2 micro-batches of 1 per rank)"],
    ),
    "bucket_size": (
        ["strategy=ddp", "strategy.bucket_cap_mb=-1"],
        2,
        ["strategy.bucket_cap_mb must be at least 1"],
    ),
    "data_path": (
        ["data=text", "data.path={tmp}/no-such-dir"],
        1,
        ["data.path", "no-such-dir", "does not exist"],
    ),
    "checkpoint_dir": (
        ["checkpoint=periodic", "checkpoint.dir={file}/ckpt"],
        1,
        ["checkpoint directory {file}/ckpt cannot be created", "{file} is a file", "checkpoint.dir"],
    ),
    "corrupt_checkpoint": (
        ["checkpoint.resume={ckpt}/corrupt"],
        1,
        ["checkpoint {ckpt}/corrupt cannot be read", "UnpicklingError"],
    ),
    "truncated_checkpoint": (
        ["checkpoint.resume={ckpt}/truncated"],
        1,
        ["checkpoint {ckpt}/truncated is incomplete", "__0_0.distcp is 4096 bytes, short of the"],
    ),
    "incompatible_model": (
        ["checkpoint.resume={ckpt}/good", "model.dim=64"],
        1,
        [
            "checkpoint {ckpt}/good does not match this model",
            "tok_embeddings.weight is [256, 128] there, [256, 64] here",
        ],
    ),
    # Checkpoint settings that would otherwise fail late or silently.
    "missing_checkpoint": (
        ["checkpoint.resume={tmp}/no-such-checkpoint"],
        1,
        ["checkpoint.resume=", "no-such-checkpoint", "is not a checkpoint"],
    ),
    "checkpoint_at_max_steps": (
        ["checkpoint.resume={ckpt}/good"],
        1,
        ["checkpoint {ckpt}/good is already at step 3", "trainer.max_steps=3"],
    ),
    "restarts_without_checkpoints": (
        ["strategy=ddp", "trainer.global_batch_size=4", "launcher.max_restarts=1"],
        2,
        ["launcher.max_restarts=1", "checkpoint.every_n_steps=0", "checkpoint=periodic"],
    ),
    "on_nonfinite": (["trainer.on_nonfinite=ignore"], 1, ["trainer.on_nonfinite", "'ignore'", "error, skip"]),
    # Tensor parallelism: a degree the world, a node or the model cannot take, or a combination it cannot run.
    "tp_world": (["strategy=tp", "strategy.tp=4"], 2, ["strategy.tp=4 does not divide the world size 2"]),
    "tp_heads": (["strategy=fsdp_tp", "strategy.tp=3", "trainer.global_batch_size=2"], 6,
                 ["strategy.tp=3 does not divide model.n_heads (query heads) (4)"]),
    "tp_kv_heads": (["strategy=tp", "attention=mqa"], 2, ["strategy.tp=2 does not divide the K/V head count (1)"]),
    "tp_groups": (["strategy=tp", "strategy.tp=2", "trainer.global_batch_size=4"], 4,
                  ["strategy=tp is one tensor-parallel group", "use strategy=fsdp_tp"]),
    "tp_no_plan": (["strategy=tp", "model=gpt2_debug"], 2, ["cannot split this model", "GPT-2 fuses q, k and v"]),
    "tp_hf_sp": (["strategy=tp", "model=hf_llama_debug"], 2, ["strategy.sequence_parallel=true with model=hf"]),
    "tp_int8": (["strategy=tp", "precision=int8"], 2, ["precision=int8 with strategy=tp", "aten._int_mm"]),
    "tp_compile": (["strategy=tp", "strategy.compile=true"], 2, ["strategy=tp with strategy.compile=true fails"]),
    "tp_compile_ac": (
        ["strategy=fsdp_tp", "strategy.compile=true", "strategy.activation_checkpointing=full",
         "trainer.global_batch_size=4"],
        4,
        ["strategy.compile=true and strategy.activation_checkpointing=full fails"],
    ),
    # Pipeline parallelism (the debug model has 5 blocks): stages the model cannot fill, a split that is not the
    # model's, micro-batches the schedule cannot use, a model it cannot split, what its schedules cannot run.
    "pp_stages": (["strategy=pp", "strategy.pp=2", "strategy.pp_schedule=interleaved_1f1b", "strategy.pp_stages_per_rank=3",
                   "trainer.global_batch_size=4"], 2, ["makes 6 stages, more than the model's 5 blocks"]),
    "pp_split": (["strategy=pp", "strategy.pp_split=[3,3]"], 2, ["strategy.pp_split=[3, 3]", "summing to 5"]),
    "pp_micro": (["strategy=pp", "trainer.global_batch_size=2", "trainer.micro_batch_size=2"], 2,
                 ["strategy.pp_schedule=1f1b needs at least 2 micro-batches (one per stage rank), got 1"]),
    "pp_rounds": (["strategy=pp", "strategy.pp_schedule=interleaved_1f1b", "strategy.pp_stages_per_rank=2",
                   "trainer.global_batch_size=5"], 2, ["divides into rounds of 2 (a multiple of 2)", "got 5"]),
    "pp_microbatches": (["strategy=pp", "trainer.micro_batch_size=2", "strategy.pp_microbatches=4"], 2,
                        ["strategy.pp_microbatches=4 but the batch layout makes", "set trainer.micro_batch_size="]),
    "pp_per_rank": (["strategy=pp", "strategy.pp_schedule=zbv"], 2,
                    ["strategy.pp_schedule=zbv runs 2 stage(s) per rank, not 1", "strategy.pp_stages_per_rank=2"]),
    "pp_world": (["strategy=pp", "strategy.pp=3"], 2, ["strategy.pp=3 does not divide the world size 2"]),
    "pp_gpt2": (["strategy=pp", "model=gpt2_debug"], 2, ["cannot split this model into stages", "(tied)"]),
    "pp_hf": (["strategy=pp", "model=hf_llama_debug"], 2, ["cannot split this model into stages", "renumber its blocks"]),
    "pp_tied": (["strategy=pp", "model.tie_embeddings=true"], 2, ["model.tie_embeddings=true with pipeline parallelism"]),
    "pp_fp16": (["strategy=pp", "precision=fp16-mixed"], 2, ["precision=fp16-mixed with strategy=pp", "bf16-mixed"]),
    # Data and validation ({inp}: the inputs fixture's files). Validation asked for with nothing held out; a text
    # source of binary files only; a token directory whose bytes or meta.json changed since prepare wrote them, or
    # whose train split is shorter than one window; a checkpoint with a flipped byte.
    "eval_no_held_out": (["data=text", "data.path={inp}/src", "data.glob=*", "data.val_fraction=0", "eval.every_n_steps=2"], 1,
                         ["eval.every_n_steps=2 asks for validation, but the data holds out no window of 33 tokens"]),
    "eval_batches": (["eval.batches=0"], 1, ["eval.batches must be at least 1, got 0"]),
    "text_binary": (["data=text", "data.path={inp}/bin", "data.glob=*"], 1,
                    ["no text found under data.path", "(2 binary file(s) skipped: a NUL byte near their start)"]),
    "text_short": (["data=text", "data.path={inp}/src/a.txt", "trainer.seq_len=4096", "model.max_seq_len=4096"], 1,
                   ["training bytes", "fewer than trainer.seq_len + 1 = 4097"]),
    "tokens_not_prepared": (["data=tokens", "data.path={inp}/src"], 1, ["{inp}/src/meta.json is missing"]),
    "tokens_seq_len": (["data=tokens", "data.path={inp}/tokens", "trainer.seq_len=4096", "model.max_seq_len=4096",
                        "eval.at_end=false"], 1, ["the train split of {inp}/tokens holds", "fewer than trainer.seq_len + 1 = 4097"]),
    "tokens_flipped": (["data=tokens", "data.path={inp}/tokens_flipped"], 1,
                       ["{inp}/tokens_flipped/train.bin does not match the digest meta.json records"]),
    "tokens_meta_edited": (["data=tokens", "data.path={inp}/tokens_edited", "model.vocab_size=100"], 1,
                           ["records token ids up to", "but a vocabulary of 100: it no longer matches its files"]),
    "tokens_vocab": (["data=tokens", "data.path={inp}/tokens", "model.vocab_size=100"], 1,
                     ["data needs a vocabulary of 256 tokens (its meta.json) but model.vocab_size is 100"]),
    # eval.samples: a pipeline cannot run the model in one forward; prompts need a window longer than themselves.
    "eval_samples_pp": (["strategy=pp", "eval.samples=1"], 2, ["eval.samples=1 with strategy=pp", "set eval.samples=0"]),
    "eval_samples_window": (["eval.samples=1", "trainer.seq_len=16"], 1,
                            ["eval.samples continue the first 16 tokens", "trainer.seq_len=16 does not exceed"]),
    # Fine-tuning (finetune=lora, precision=nf4, model.init_from).
    "lora_targets": (["finetune=lora", "finetune.target_modules=[q_proj]"], 1,
                     ["finetune.target_modules: q_proj match no Linear layer", "its linear layers are w1, w2, w3, wk, wo, wq, wv"]),
    "lora_rank": (["finetune=lora", "finetune.rank=0"], 1, ["finetune.rank must be at least 1, got 0"]),
    "nf4_full": (["precision=nf4"], 1, ["precision=nf4 freezes the base in 4 bits, and with finetune=full nothing would train",
                                        "add finetune=lora"]),
    "nf4_shape": (["finetune=lora", "precision=nf4"], 1,
                  ["precision=nf4 cannot store layers.0.feed_forward.w1 (352 x 128)", "multiple of NF4's 16384 weights"]),
    "lora_tp": (["finetune=lora", "strategy=tp"], 2, ["finetune=lora with strategy=tp", "use strategy=fsdp"]),
    "lora_fp8": (["finetune=lora", "precision=fp8"], 1, ["finetune=lora with precision=fp8", "nf4 (QLoRA)"]),
    "lora_other_base": (["finetune=lora", "checkpoint.resume={ckpt}/lora", "trainer.seed=7", "trainer.max_steps=6"], 1,
                        ["holds adapters trained on the base random, trainer.seed=1234, not this run's random, trainer.seed=7"]),
    "init_from_nothing": (["model.init_from={tmp}/nothing"], 1,
                          ["model.init_from={tmp}/nothing is neither a Hugging Face Llama directory", "nor a shardlab checkpoint"]),
    "init_from_shapes": (["model.init_from={ckpt}/good", "model.dim=64"], 1,
                         ["does not hold this model's weights: tok_embeddings.weight is [256, 128] there, [256, 64] here"]),
    "flipped_checkpoint": (["checkpoint.resume={ckpt}/flipped"], 1,
                           ["checkpoint {ckpt}/flipped fails verification: __0_0.distcp does not match the digest",
                            "set checkpoint.resume to an older checkpoint"]),
}  # fmt: skip

# The other commands, each row (command, its arguments, what the one line must name). {tmp}: the row's own empty
# directory, which must stay empty; {inp}: the inputs fixture; {ckpt}: the checkpoints; {file}: a regular file.
COMMAND_ROWS = {
    # prepare: what it reads
    "prepare_missing_source": ("prepare", ["{tmp}/nothing", "{tmp}/out"], ["source {tmp}/nothing does not exist"]),
    "prepare_empty_source": ("prepare", ["{inp}/src", "{tmp}/out", "--glob", "*.none"], ["holds no non-empty file matching --glob '*.none'"]),
    "prepare_binary_file": ("prepare", ["{inp}/bin/blob.dat", "{tmp}/out"], ["is a binary file (a NUL byte in the first 8000 bytes"]),
    "prepare_binary_dir": ("prepare", ["{inp}/bin", "{tmp}/out"], ["holds only binary files (2)"]),
    "prepare_bad_json": ("prepare", ["{inp}/bad.jsonl", "{tmp}/out"], ["{inp}/bad.jsonl:2 is not JSON", "fix or remove that line"]),
    "prepare_number_text": ("prepare", ["{inp}/number.jsonl", "{tmp}/out"], ["{inp}/number.jsonl:2: 'text' is 5, not a string"]),
    "prepare_null_text": ("prepare", ["{inp}/null.jsonl", "{tmp}/out"], ["{inp}/null.jsonl:3: 'text' is null, not a string"]),
    "prepare_no_field": ("prepare", ["{inp}/body.jsonl", "{tmp}/out"], ["have no field 'text'", "--text-field to one of body"]),
    "prepare_bad_parquet": ("prepare", ["{inp}/broken.parquet", "{tmp}/out"], ["{inp}/broken.parquet cannot be read as Parquet"]),
    "prepare_mixed": ("prepare", ["{inp}", "{tmp}/out"], ["mixes", "prepare one kind at a time"]),
    "prepare_not_a_tokenizer": ("prepare", ["{inp}/src", "{tmp}/out", "--tokenizer", "{inp}/src"], ["--tokenizer", "is not a tokenizer directory"]),
    "prepare_empty_split": ("prepare", ["{inp}/src", "{tmp}/out", "--val-fraction", "0.01"], ["--val-fraction 0.01 of 3 documents leaves the val split empty"]),
    "prepare_val_fraction": ("prepare", ["{inp}/src", "{tmp}/out", "--val-fraction", "1.5"], ["--val-fraction must be between 0 and 1 (both splits need documents), got 1.5"]),
    "prepare_num_proc": ("prepare", ["{inp}/src", "{tmp}/out", "--num-proc", "0"], ["--num-proc must be at least 1, got 0"]),
    "prepare_bad_flag": ("prepare", ["{inp}/src", "{tmp}/out", "--val_fraction", "0.5"], ["unrecognized arguments: --val_fraction", "--help"]),
    "prepare_not_a_number": ("prepare", ["{inp}/src", "{tmp}/out", "--val-fraction", "half"], ["argument --val-fraction: invalid float value: 'half'"]),
    # prepare: what it writes
    "prepare_out_is_source": ("prepare", ["{inp}/src", "{inp}/src", "--overwrite"], ["out {inp}/src is, holds or lies inside the source"]),
    "prepare_out_in_source": ("prepare", ["{inp}/src", "{inp}/src/tokens"], ["lies inside the source {inp}/src"]),
    "prepare_out_holds_source": ("prepare", ["{inp}/src", "{inp}", "--overwrite"], ["out {inp} is, holds or lies inside the source"]),
    "prepare_out_under_file": ("prepare", ["{inp}/src", "{file}/out"], ["out {file}/out cannot be created ({file} is a file"]),
    "prepare_out_is_file": ("prepare", ["{inp}/src", "{file}"], ["out {file} cannot be created", "is a file"]),
    "prepare_out_not_empty": ("prepare", ["{inp}/src", "{inp}/other"], ["{inp}/other already exists and is not empty", "--overwrite"]),
    "prepare_overwrite_other": ("prepare", ["{inp}/src", "{inp}/other", "--overwrite"], ["holds files that prepare did not write", "choose another out"]),
    # export
    "export_missing": ("export", ["{tmp}/nothing", "{tmp}/m.safetensors"], ["{tmp}/nothing is not a checkpoint", "give export a checkpoint directory"]),
    "export_not_a_checkpoint": ("export", ["{inp}/src", "{tmp}/hf"], ["{inp}/src is not a checkpoint"]),
    "export_corrupt": ("export", ["{ckpt}/corrupt", "{tmp}/m.pt"], ["checkpoint {ckpt}/corrupt cannot be read", "give export another checkpoint"]),
    "export_truncated": ("export", ["{ckpt}/truncated", "{tmp}/m.pt"], ["checkpoint {ckpt}/truncated is incomplete", "give export another checkpoint"]),
    "export_flipped": ("export", ["{ckpt}/flipped", "{tmp}/hf"], ["checkpoint {ckpt}/flipped fails verification: __0_0.distcp", "give export another checkpoint"]),
    "export_file_exists": ("export", ["{ckpt}/good", "{inp}/model.safetensors"], ["out {inp}/model.safetensors already exists", "--overwrite"]),
    "export_dir_not_empty": ("export", ["{ckpt}/good", "{inp}/other"], ["{inp}/other already exists and is not empty", "--overwrite"]),
    "export_overwrite_other": ("export", ["{ckpt}/good", "{inp}/other", "--overwrite"], ["holds more than an earlier export", "choose another directory"]),
    "export_into_checkpoint": ("export", ["{ckpt}/good", "{ckpt}/good", "--overwrite"], ["is or holds the checkpoint being exported"]),
    "export_into_run": ("export", ["{ckpt}/run", "{ckpt}/run", "--overwrite"], ["out {ckpt}/run is or holds the checkpoint being exported"]),
    "export_under_file": ("export", ["{ckpt}/good", "{file}/hf"], ["out {file}/hf cannot be written", "is a file"]),
    "export_dir_as_file": ("export", ["{ckpt}/good", "{inp}/src.pt"], ["out {inp}/src.pt is a directory, not a .pt file"]),
    "export_file_as_dir": ("export", ["{ckpt}/good", "{file}"], ["out {file} is a file: give a directory for a Hugging Face model"]),
    "export_no_out": ("export", ["{ckpt}/good"], ["the following arguments are required: out"]),
    "export_adapters_full": ("export", ["{ckpt}/good", "{tmp}/adapters", "--adapters"],
                             ["is not a LoRA checkpoint", "export it without --adapters"]),
    "export_adapters_into_model": ("export", ["{ckpt}/lora", "{inp}/hfdir", "--adapters", "--overwrite"],
                                   ["out {inp}/hfdir holds a model (config.json)", "a directory of their own"]),
    # plan
    "plan_memory": ("plan", ["plan.device_memory_gb=-1"], ["plan.device_memory_gb must be positive, got -1.0"]),
    "plan_device": ("plan", ["plan.device=tpu"], ["plan.device must be cpu or cuda, got 'tpu'"]),
    "plan_model": ("plan", ["model=llama4"], ["model=llama4 is not an option of model"]),
    "plan_nproc": ("plan", ["launcher.nproc_per_node=0"], ["launcher.nproc_per_node must be at least 1, got 0"]),
    "plan_tp": ("plan", ["strategy=tp", "strategy.tp=3", "launcher.nproc_per_node=4"], ["strategy.tp=3 does not divide the world size 4"]),
    "plan_flag": ("plan", ["--device", "cpu"], ["unknown option --device", "takes key=value overrides"]),
    # tune
    "tune_dir_file": ("tune", ["tune.dir={file}", "plan.device=cpu"], ["tune.dir={file} cannot be created", "is a file"]),
    "tune_dir_under_file": ("tune", ["tune.dir={file}/t", "plan.device=cpu"], ["tune.dir={file}/t cannot be created"]),
    "tune_budget": ("tune", ["tune.budget_minutes=-1", "tune.dir={tmp}/t"], ["tune.budget_minutes must be positive, got -1.0"]),
    "tune_strategy": ("tune", ["tune.strategies=[nope]", "tune.dir={tmp}/t", "plan.device=cpu"], ["tune.strategies holds 'nope'"]),
    "tune_headroom": ("tune", ["tune.headroom=2", "tune.dir={tmp}/t"], ["tune.headroom must be in [0, 1), got 2.0"]),
    "tune_flag": ("tune", ["--budget", "5"], ["unknown option --budget"]),
    # sbatch
    "sbatch_time": ("sbatch", ["--time", "-5", "--run-root", "{tmp}/slurm"], ["--time must be at least 1, got -5"]),
    "sbatch_memory": ("sbatch", ["--mem-gb", "0", "--run-root", "{tmp}/slurm"], ["--mem-gb must be at least 1, got 0"]),
    "sbatch_cpus": ("sbatch", ["--cpus-per-task", "-1", "--run-root", "{tmp}/slurm"], ["--cpus-per-task must be at least 1, got -1"]),
    "sbatch_name": ("sbatch", ["--job-name", "", "--run-root", "{tmp}/slurm"], ["--job-name must be a non-empty single line"]),
    "sbatch_log_dir": ("sbatch", ["--output", "{file}/x.out"], ["the job's log directory {file} cannot be created"]),
    "sbatch_model": ("sbatch", ["model=nope", "--run-root", "{tmp}/slurm"], ["model=nope is not an option of model"]),
    "sbatch_flag": ("sbatch", ["--nodes", "2", "--run-root", "{tmp}/slurm"], ["unknown option --nodes"]),
    # k8s: the manifest's values Kubernetes or the operator would reject
    "k8s_image": ("k8s", ["model=debug"], ["the following arguments are required: --image"]),
    "k8s_name": ("k8s", ["--image", "x", "--name", "Shard_Lab"], ["--name='Shard_Lab' is not a Kubernetes name"]),
    "k8s_nproc": ("k8s", ["--image", "x", "launcher.nproc_per_node=auto"], ["launcher.nproc_per_node=auto: give the workers per pod"]),
    "k8s_gpus": ("k8s", ["--image", "x", "strategy=ddp", "launcher.nproc_per_node=4", "--gpus-per-node", "2"], ["--gpus-per-node=2, but launcher.nproc_per_node=4"]),
    "k8s_memory": ("k8s", ["--image", "x", "--memory-gb", "0"], ["--memory-gb must be at least 1, got 0"]),
    "k8s_strategy": ("k8s", ["--image", "x", "strategy=nope"], ["strategy=nope is not an option of strategy"]),
    "k8s_flag": ("k8s", ["--image", "x", "--nodes", "2"], ["unknown option --nodes"]),
    # calibrate: refused before anything is measured
    "calibrate_device": ("calibrate", ["trainer.device=tpu"], ["unknown trainer.device 'tpu'"]),
    "calibrate_cuda": ("calibrate", ["trainer.device=cuda"], ["trainer.device=cuda but no CUDA GPU is visible"]),
    "calibrate_nproc": ("calibrate", ["launcher.nproc_per_node=0"], ["launcher.nproc_per_node must be at least 1, got 0"]),
    "calibrate_flag": ("calibrate", ["--world", "2"], ["unknown option --world"]),
    # sample
    "sample_missing": ("sample", ["{tmp}/nothing"], ["{tmp}/nothing is not a checkpoint", "give sample a checkpoint directory"]),
    "sample_flipped": ("sample", ["{ckpt}/flipped"], ["fails verification: __0_0.distcp", "give sample another checkpoint"]),
    "sample_synthetic": ("sample", ["{ckpt}/good"], ["was trained on synthetic tokens: there is no text to sample"]),
    "sample_temperature": ("sample", ["{ckpt}/good", "--temperature", "-1"], ["--temperature must be 0 (greedy) or more, got -1.0"]),
    "sample_tokens": ("sample", ["{ckpt}/good", "--max-new-tokens", "0"], ["--max-new-tokens must be at least 1, got 0"]),
    "sample_top_k": ("sample", ["{ckpt}/good", "--top-k", "-5"], ["--top-k must be 0 (off) or more, got -5"]),
    "sample_device": ("sample", ["{ckpt}/good", "--device", "tpu"], ["unknown trainer.device 'tpu'"]),
    # report
    "report_missing": ("report", ["{tmp}/sweep"], ["{tmp}/sweep is not a directory"]),
    "report_file": ("report", ["{file}"], ["{file} is not a directory"]),
    "report_empty": ("report", ["{inp}/src"], ["no job directories (summary.json or .hydra/) under {inp}/src"]),
    "report_two": ("report", ["{tmp}", "{tmp}"], ["give one sweep directory, got 2 arguments"]),
}  # fmt: skip
PARALLEL = 8  # CLI processes at once: each fails before training


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the size unchanged: only a digest tells
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> Path:
    # What the rows read: three text documents, binary files, JSON Lines that do not parse or hold no text, a file
    # that is not Parquet, a directory of someone's files, an earlier export file, a directory named like a file,
    # and token files as prepare wrote them, with a flipped byte, and with a meta.json edited to a smaller vocabulary.
    root = tmp_path_factory.mktemp("inputs")
    (root / "src").mkdir()
    for name, word in (("a", "alpha"), ("b", "beta"), ("c", "gamma")):
        (root / "src" / f"{name}.txt").write_text(f"{word} " * 120)
    (root / "bin").mkdir()
    (root / "bin" / "blob.dat").write_bytes(b"\0\1\2" * 1000)
    (root / "bin" / "blob2.dat").write_bytes(bytes(range(256)) * 4)
    (root / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    (root / "number.jsonl").write_text('{"text": "a"}\n{"text": 5}\n{"text": "c"}\n')
    (root / "null.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": null}\n')
    (root / "body.jsonl").write_text('{"body": "a"}\n{"body": "b"}\n')
    (root / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    (root / "other").mkdir()
    (root / "other" / "notes.txt").write_text("someone's notes\n")
    (root / "model.safetensors").write_bytes(b"an earlier export")
    (root / "src.pt").mkdir()
    (root / "hfdir").mkdir()
    (root / "hfdir" / "config.json").write_text("{}\n")
    prepare(str(root / "src"), str(root / "tokens"), val_fraction=0.34, num_proc=1)
    shutil.copytree(root / "tokens", root / "tokens_flipped")
    flip_byte(root / "tokens_flipped" / "train.bin")
    shutil.copytree(root / "tokens", root / "tokens_edited")
    meta = json.loads((root / "tokens_edited" / "meta.json").read_text())
    (root / "tokens_edited" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100}))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # A real 3-step checkpoint (model=debug, as every row trains) and its run directory, a copy whose .metadata is
    # garbage (saved, as it were, before digests), one whose shard file was cut short, and one with a byte flipped.
    root = tmp_path_factory.mktemp("checkpoints")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_in_process(compose_config("checkpoint=periodic", "checkpoint.every_n_steps=3"), root / "run")
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(root / "run" / "checkpoints" / "step_00000003", root / "good")
    shutil.copytree(root / "good", root / "corrupt")
    (root / "corrupt" / ".metadata").write_bytes(b"\x0bnot a pickle" * 100)
    (root / "corrupt" / "digests.json").unlink()  # as saved before digests: its pickle is read, and refused
    shutil.copytree(root / "good", root / "truncated")
    with open(root / "truncated" / "__0_0.distcp", "r+b") as f:
        f.truncate(4096)
    shutil.copytree(root / "good", root / "flipped")
    flip_byte(root / "flipped" / "__0_0.distcp")
    torch.set_num_threads(1)
    try:  # a LoRA checkpoint: adapters only, on a random base of trainer.seed=1234
        lora = compose_config("finetune=lora", "checkpoint=periodic", "checkpoint.every_n_steps=3")
        train_in_process(lora, root / "lora-run")
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(root / "lora-run" / "checkpoints" / "step_00000003", root / "lora")
    return root


@pytest.fixture(scope="module")
def failures(tmp_path_factory, ckpt, afile):
    # {row: (tmp, exit code, stdout, stderr, checkpoint digest before, after)}
    before = _digest(ckpt)
    results, running = {}, []
    for row, (overrides, run_dir, _, *env) in CLI_ROWS.items():
        tmp = tmp_path_factory.mktemp(row)
        fill = {"tmp": tmp, "ckpt": ckpt, "file": afile}
        args = cli_args(
            tmp, *(o.format(**fill) for o in overrides), run_dir=run_dir.format(**fill) if run_dir else None
        )
        running.append((row, tmp, start(args, env={**cli_env(), **(env[0] if env else {})})))
        if len(running) == PARALLEL:
            row, tmp, proc = running.pop(0)
            results[row] = (tmp, *finish(proc))
    for row, tmp, proc in running:
        results[row] = (tmp, *finish(proc))
    return results, before, _digest(ckpt), afile, ckpt


@pytest.fixture(scope="module")
def afile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("file") / "afile"
    path.write_text("a regular file where a directory is expected\n")
    return path


@pytest.mark.parametrize("row", CLI_ROWS)
def test_one_clear_line_before_any_worker_starts(failures, row):
    results, before, after, afile, ckpt = failures
    tmp, code, out, err = results[row]
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardlab: error: "), err
    for name in CLI_ROWS[row][2]:
        assert name.format(tmp=tmp, ckpt=ckpt, file=afile) in lines[0], lines[0]
    # The launcher says "run directory" only once the checks passed and workers are about to start.
    assert "run directory" not in out, out
    assert not (tmp / "run" / "metrics.jsonl").exists()
    assert not (tmp / "run" / "checkpoints").exists()
    # Nothing already saved is damaged: the checkpoints (good, corrupt, truncated) are byte-identical.
    assert after == before
    assert afile.read_text() == "a regular file where a directory is expected\n"


@pytest.mark.parametrize("row", CHECK_ROWS)
def test_checks_name_the_fix_and_touch_nothing(ckpt, afile, inp, tmp_path, row):
    overrides, world, names = CHECK_ROWS[row]
    fill = {"tmp": tmp_path, "ckpt": ckpt, "file": afile, "inp": inp}
    before = _digest(ckpt), _digest(inp)
    with pytest.raises(ValueError) as info:
        validate(compose_config(*(o.format(**fill) for o in overrides)), world, "cpu")
    line = describe_error(info.value)  # what the CLI prints after "shardlab: error: "
    assert "\n" not in line
    for name in names:
        assert name.format(**fill) in line, line
    assert (_digest(ckpt), _digest(inp)) == before and list(tmp_path.iterdir()) == []
    assert afile.read_text() == "a regular file where a directory is expected\n"


def test_hydra_full_error_still_gives_hydras_traceback(tmp_path):
    # A user who sets HYDRA_FULL_ERROR=1 asked for Hydra's own report with the stack, not our one line.
    proc = subprocess.run(
        [sys.executable, "train.py", "model=nope", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env={**cli_env(), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "Could not find 'model/nope'" in proc.stderr
    assert "shardlab: error" not in proc.stderr


def test_fp8_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    # The precision rule a GPU machine hits, checked as if this machine had an A100 (capability 8.0, bf16).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with pytest.raises(ValueError, match=r"precision=fp8 needs fp8 tensor cores.*this GPU is 8\.0"):
        validate(compose_config("precision=fp8", "trainer.device=auto"), 1, "cuda", (8, 0))


COMMANDS = {
    "prepare": prepare_cli.main,
    "export": export.main,
    "plan": plan.main,
    "tune": tune.main,
    "sbatch": sbatch.main,
    "k8s": k8s.main,
    "calibrate": calibrate.main,
    "report": report.main,
    "sample": sample.main,
}


@pytest.mark.parametrize("row", COMMAND_ROWS)
def test_every_command_says_what_to_change_in_one_line_and_writes_nothing(
    row, inp, ckpt, afile, tmp_path, capsys
):
    command, argv, names = COMMAND_ROWS[row]
    fill = {"tmp": tmp_path, "inp": inp, "ckpt": ckpt, "file": afile}
    before = _digest(inp), _digest(ckpt)
    try:
        code = COMMANDS[command]([a.format(**fill) for a in argv])  # report returns its exit code
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardlab: error: "), err
    for name in names:
        assert name.format(**fill) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left
    assert (_digest(inp), _digest(ckpt)) == before
    assert afile.read_text() == "a regular file where a directory is expected\n"


def test_the_commands_debug_flag_gives_the_traceback(inp, tmp_path):
    # Bad input is one line; --debug is for the rare case where the line is not enough.
    with pytest.raises(ValueError, match="holds only binary files"):
        prepare_cli.main([str(inp / "bin"), str(tmp_path / "out"), "--debug"])
    with pytest.raises(ValueError, match="plan.device must be cpu or cuda"):
        plan.main(["plan.device=tpu", "--debug"])
