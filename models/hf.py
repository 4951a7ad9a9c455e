# Hugging Face transformers causal LMs behind the native models' interface: forward(tokens) -> logits, and
# seeded name-based initialisation (fill_param_ / init_weights / reset_buffers), so the meta-device FSDP
# path and the single-process path start from the same weights. Strategies find the decoder layers through
# the model's _no_split_modules (strategies/common.py) and checkpoint through its own hook
# (enable_activation_checkpointing). transformers is imported only when an HF model is chosen, and nothing
# is ever downloaded: name_or_path must be a local directory.
import contextlib
import copy
import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import ATTENTION, one_of
from .flops import num_params
from .llama import LORA_A, LORA_B, canonical_name, fill_adapter_, seeded_generator
from .plan import ParallelPlan

# shardlab's generic model fields -> the names every transformers config answers to (GPT2Config maps
# hidden_size to n_embd and so on through its attribute_map).
HF_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}
# attention= option -> attn_implementation. flash is SDPA with its backend pinned to flash (see forward),
# or flash_attention_2 where the flash-attn package is installed and the tokens are on a GPU.
ATTN_IMPLEMENTATION = {"standard": "eager", "sdpa": "sdpa", "flash": "sdpa"}
# Weight matrices that write into the residual stream (Llama o_proj/down_proj, GPT-2 c_proj): scaled by
# 1/sqrt(2 * n_layers) at init, as the native models do.
RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "c_proj.weight")
_NO_PATH = (
    "shardlab never downloads at run time: download the model first (e.g. `hf download <repo> --local-dir "
    "DIR`, or save_pretrained(DIR)) and set model.name_or_path=DIR, or give the architecture inline as "
    "model.hf_config (with its model_type, e.g. model=hf_llama_debug)"
)

PRESETS: dict[str, dict] = {
    # model.name_or_path or model.hf_config says what to build; base_config is a preset's own config fields,
    # which model.hf_config and then the generic fields (model.dim, ...) override.
    "hf": {},
    # The native `debug` Llama's shapes as transformers' LlamaConfig (~1.07 M parameters, byte vocab).
    "hf_llama_debug": dict(
        base_config=dict(
            model_type="llama",
            vocab_size=256,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=5,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    ),
    # The native `gpt2_debug` shapes as GPT2Config, without dropout (as the native model), byte vocab.
    "hf_gpt2_debug": dict(
        base_config=dict(
            model_type="gpt2",
            vocab_size=256,
            n_embd=128,
            n_layer=4,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    ),
}


@dataclass
class HFArgs:
    name_or_path: str | None = (
        None  # a local directory with config.json (and, if present, safetensors weights)
    )
    hf_config: dict[str, Any] = field(default_factory=dict)  # config fields; with model_type when no path
    base_config: dict[str, Any] = field(default_factory=dict)  # the preset's config fields, under hf_config
    attention: str = "sdpa"  # a key of models.attention.ATTENTION
    # Generic overrides (HF_NAMES); after __post_init__ they hold the built config's values.
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None  # None after __post_init__: the architecture has no grouped K/V heads
    vocab_size: int | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None

    def __post_init__(self):
        one_of("attention", self.attention, ATTENTION)
        self.config = build_config(self)  # a transformers PretrainedConfig
        for ours, theirs in HF_NAMES.items():
            setattr(self, ours, getattr(self.config, theirs, None))

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def has_kv_heads(self) -> bool:
        return hasattr(self.config, "num_key_value_heads")

    @property
    def family(self) -> str | None:
        # Which native family's activations this architecture has, for the memory planner: "llama" (RMSNorm,
        # rotary, SwiGLU, grouped K/V: Llama, Mistral, Qwen2; within 15% of MemTracker, tests/test_memory.py),
        # or None. transformers' GPT-2 is not GPT-2-like enough: its tanh GELU is written out op by op and its
        # dropout layers keep masks even at p=0, so it saves about half again what the native GPT-2 does
        # (measured: the native terms came to 0.68 of MemTracker's peak).
        return {"llama": "llama", "mistral": "llama", "qwen2": "llama"}.get(self.config.model_type)

    @property
    def ffn_hidden_dim(self) -> int:
        return getattr(self.config, "intermediate_size", None) or 4 * self.dim

    @property
    def max_positions(self) -> int:
        return self.max_seq_len


def build_config(args: HFArgs):
    from transformers import AutoConfig

    fields = {**args.base_config, **args.hf_config}
    if args.name_or_path is not None:
        path = Path(args.name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model.name_or_path={args.name_or_path!r} is not a local directory with a config.json: {_NO_PATH}"
            )
        fields = {**json.loads((path / "config.json").read_text()), **fields}
    elif "model_type" not in fields:
        raise ValueError(f"model=hf needs model.name_or_path or model.hf_config.model_type: {_NO_PATH}")
    for ours, theirs in HF_NAMES.items():
        value = getattr(args, ours)
        if value is None:
            continue
        key = next((k for k in (theirs, _attribute_map(fields).get(theirs)) if k in args.hf_config), theirs)
        if key in args.hf_config and args.hf_config[key] != value:  # never silently overrule either
            raise ValueError(
                f"model.{ours}={value} and model.hf_config.{key}={args.hf_config[key]} both set the "
                f"{theirs} of the Hugging Face config: keep one of them"
            )
        fields[_attribute_map(fields).get(theirs, theirs)] = value
    # A config is built once, with every field: derived fields (Llama's head_dim) are computed at init.
    config = AutoConfig.for_model(**fields)
    _check_known(config, {**args.base_config, **args.hf_config})
    if args.n_kv_heads is not None and not hasattr(config, "num_key_value_heads"):
        raise ValueError(f"{type(config).__name__} has no grouped K/V heads: leave model.n_kv_heads unset")
    return config


def _attribute_map(fields: dict) -> dict:
    from transformers import CONFIG_MAPPING

    return getattr(CONFIG_MAPPING[fields["model_type"]], "attribute_map", {})


def _check_known(config, overrides: dict) -> None:
    # transformers keeps unknown keyword arguments as plain attributes, so a typo in model.hf_config would
    # silently do nothing. Known: the config's dataclass fields, its attribute_map, or a key its __init__
    # consumed (rope_theta goes into rope_parameters). config.json is not checked: old ones carry legacy keys.
    if not dataclasses.is_dataclass(config):
        return
    known = {f.name for f in dataclasses.fields(config)} | set(type(config).attribute_map)
    unknown = sorted(k for k in overrides if k not in known and k in vars(config))
    if unknown:
        raise ValueError(
            f"{type(config).__name__} has no field(s) {unknown} (model.hf_config or config.json); valid: "
            f"{', '.join(sorted(known))}"
        )


def _flash_attention_2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


_COUNTS: dict[tuple[str, bool], int] = {}


def param_count(args: HFArgs, exclude_embedding: bool = False) -> int:
    # The native models' convention (models/flops.py num_params), counted on the module the config builds:
    # on the meta device, shapes only, so even an 8 B config allocates nothing.
    key = (args.config.to_json_string(), exclude_embedding)
    if key not in _COUNTS:
        with torch.device("meta"):
            _COUNTS[key] = num_params(HFCausalLM(args), exclude_embedding=exclude_embedding)
    return _COUNTS[key]


def checkpoint_files(name_or_path: str | None) -> dict[str, Path] | None:
    # tensor name -> safetensors file, when the directory holds weights; None: initialise randomly.
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", framework="pt") as f:
            return dict.fromkeys(f.keys(), path / "model.safetensors")
    if (index := path / "model.safetensors.index.json").is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    if list(path.glob("*.bin")):
        raise ValueError(
            f"{path} holds PyTorch .bin weights; shardlab reads safetensors only: load the model once with "
            "transformers and save_pretrained(DIR) (safetensors by default), then point model.name_or_path at DIR"
        )
    return None


def local_rows(t) -> slice | None:
    # The rows of a parameter that a DTensor's local shard holds when the DTensor is split along dim 0 on one mesh
    # dimension and replicated on the rest, as FSDP2 (and HSDP) shards: torch.chunk's split, ceil(n / ranks) rows
    # each, the last shards shorter or empty. None for any other layout (or a plain tensor).
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return None
    split = [i for i, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if len(split) != 1 or t.placements[split[0]] != Shard(0):
        return None
    n, ranks = t.shape[0], t.device_mesh.size(split[0])
    step = -(-n // ranks)
    start = min(t.device_mesh.get_local_rank(split[0]) * step, n)
    return slice(start, min(start + step, n))


def read_safetensor_into(path: Path, key: str, target: torch.Tensor) -> None:
    # Fills target (a full tensor, or a DTensor parameter: its local shard) with tensor `key` of a safetensors file.
    # A shard split along dim 0 reads only its own rows (safetensors slices the file without reading the rest), so a
    # sharded model never holds another rank's part of any weight; other layouts read the whole tensor and keep
    # their part.
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    with safe_open(str(path), framework="pt") as f:
        if not isinstance(target, DTensor):
            target.copy_(f.get_tensor(key))
            return
        if (rows := local_rows(target)) is not None:
            target.to_local().copy_(f.get_slice(key)[rows])
            return
        full = f.get_tensor(key).to(target.device)
    # src_data_rank=None: every rank read the same full tensor, so each keeps its part locally.
    part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
    target.to_local().copy_(part.to_local())


_SHAPES: dict[str, tuple] = {}
_PLANS: dict[str, ParallelPlan] = {}  # config -> its module's parallel plan


def param_shapes(args: HFArgs):
    # The module's own parameters, built on the meta device (nothing allocated): the decoder layers (the
    # ModuleList of the class _no_split_modules names) are the blocks, the rest the root; lookup tables are
    # the embeddings no Linear shares its weight with.
    from .llama import ParamShapes

    key = args.config.to_json_string()
    if key not in _SHAPES:
        with torch.device("meta"):
            model = HFCausalLM(args)
        layers = decoder_layers(model.hf)
        block = {n: tuple(p.shape) for n, p in layers[0].named_parameters()}
        in_layers = {id(p) for p in layers.parameters()}
        root = {n: tuple(p.shape) for n, p in model.named_parameters() if id(p) not in in_layers}
        linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - linear
        lookups = tuple(n for n, p in model.named_parameters() if id(p) in tables)
        _SHAPES[key] = (root, block, lookups)
    root, block, lookups = _SHAPES[key]
    return ParamShapes(root, block, lookups)


def parallel_plan(args: HFArgs) -> ParallelPlan:
    # The plan of the module these arguments build, read off it on the meta device (nothing allocated).
    key = args.config.to_json_string()
    if key not in _PLANS:
        with torch.device("meta"):
            _PLANS[key] = HFCausalLM(args).parallel_plan
    return _PLANS[key]


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    # The ModuleList of the decoder-layer class a transformers model names in _no_split_modules (what
    # accelerate's and FSDP's auto-wrap policies use: LlamaDecoderLayer, GPT2Block, ...).
    names = set(getattr(hf_model, "_no_split_modules", None) or ())
    for m in hf_model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(type(b).__name__ in names for b in m):
            return m
    raise ValueError(
        f"cannot find the decoder layers of {type(hf_model).__name__} (its _no_split_modules: {sorted(names)})"
    )


def hf_config(args: HFArgs):
    return copy.deepcopy(args.config)


def to_hf(state: dict) -> dict:
    # HFCausalLM holds the transformers model as .hf: its own names, without that prefix.
    return {name.removeprefix("hf."): tensor for name, tensor in state.items()}


class HFCausalLM(nn.Module):
    def __init__(self, args: HFArgs):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.args = args
        # fp32 whatever the config says: the precision option decides dtypes. A copy: from_config writes to it.
        self.hf = AutoModelForCausalLM.from_config(
            copy.deepcopy(args.config),
            attn_implementation=ATTN_IMPLEMENTATION[args.attention],
            dtype=torch.float32,
        )
        self.hf.train()
        self._checkpoint = checkpoint_files(args.name_or_path)
        # Name-based init needs to know, before any wrapper renames things: which parameters are norms'
        # (weight 1, bias 0: transformers' own rule is a class name with "Norm"), and which are tied.
        self._norm_params = {
            f"{mod_name}.{leaf}".lstrip(".")
            for mod_name, m in self.hf.named_modules()
            if "Norm" in type(m).__name__
            for leaf, _ in m.named_parameters(recurse=False)
        }
        first: dict[int, str] = {}  # id(parameter) -> its first name
        owner = {
            name: first.setdefault(id(p), name)
            for name, p in self.hf.named_parameters(remove_duplicate=False)
        }
        self._tied = {k: v for k, v in owner.items() if k != v}  # a tied weight's other names -> its first

    def _apply(self, fn, recurse=True):
        # to_empty() from meta makes a new Parameter per module, untying the output head from the embedding
        # (as in the native Transformer); tie it again.
        super()._apply(fn, recurse)
        if self._tied and getattr(self.args.config, "tie_word_embeddings", False):
            out, inp = self.hf.get_output_embeddings(), self.hf.get_input_embeddings()
            if out is not None and out.weight is not inp.weight:
                out.weight = inp.weight
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.args.max_seq_len}")
        if (
            self.args.attention == "flash"
            and tokens.is_cuda
            and self.hf.config._attn_implementation == "sdpa"
        ):
            # Decided here, where the device is known (a sharded model is built on meta): the flash-attn
            # package's kernels when it is installed, else SDPA's own flash kernel.
            if _flash_attention_2_available():
                self.hf.set_attn_implementation("flash_attention_2")
        # flash: SDPA pinned to its flash kernel, so a fallback to the math kernel (T x T scores) is an error.
        pinned = self.args.attention == "flash" and self.hf.config._attn_implementation == "sdpa"
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if pinned else contextlib.nullcontext():
            return self.hf(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)

    @functools.cached_property
    def parallel_plan(self) -> ParallelPlan:
        # transformers' own plan, read and not copied: config.base_model_tp_plan names the base model's
        # projections ("layers.*.self_attn.q_proj": "colwise"); the blocks are the decoder layers.
        layers = decoder_layers(self.hf)
        names = {id(m): n for n, m in self.named_modules()}
        tp = getattr(self.args.config, "base_model_tp_plan", None) or {}
        inner = {k.split(".*.", 1)[1]: v for k, v in tp.items() if ".*." in k}
        other = sorted({v for v in tp.values() if v not in ("colwise", "rowwise")})
        base = getattr(self.hf, self.hf.base_model_prefix, self.hf)
        final = next((m for m in base.children() if "Norm" in type(m).__name__), None)
        return ParallelPlan(
            blocks=names[id(layers)],
            colwise=tuple(k for k, v in inner.items() if v == "colwise"),
            rowwise=tuple(k for k, v in inner.items() if v == "rowwise"),
            norms=tuple(n for n, m in layers[0].named_modules() if "Norm" in type(m).__name__),
            embedding=names[id(self.hf.get_input_embeddings())],
            final_norm=names[id(final)] if final is not None else None,
            head=names.get(id(self.hf.get_output_embeddings())),
            unsplit=None
            if tp and not other
            else f"transformers has no tensor-parallel plan for {self.args.config.model_type} "
            "(config.base_model_tp_plan) of column- and row-parallel projections only"
            + (f" (it also uses {', '.join(other)})" if other else "")
            + ": use a Llama-like model (llama, mistral, qwen2) for tensor parallelism",
            # transformers' base_model_pp_plan names each stage's inputs and outputs, but its forward slices
            # one ModuleList of every decoder layer, so a stage would have to renumber its blocks (layers.5 as
            # layers.0) and its checkpoint would not load under any other layout.
            unpiped=f"transformers' {self.args.config.model_type} forward runs its one list of decoder layers "
            "from the start, so a pipeline stage would renumber its blocks and its checkpoint would load under no "
            "other layout: use a native model (model=llama_*) for pipeline parallelism",
        )

    def enable_activation_checkpointing(self, every: int) -> None:
        # The model's own hook: every `every`-th decoder layer recomputes its activations in backward.
        # (transformers 5's name for gradient_checkpointing_enable). Non-reentrant, which FSDP2 needs.
        self.hf.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)

    def _hf_name(self, name: str) -> str:
        name = canonical_name(name)
        return name.removeprefix("hf.")

    def fill_param_(self, name: str, tensor: torch.Tensor, seed: int) -> None:
        # The checkpoint's tensor when name_or_path holds weights; else seeded from (seed, name) alone, so
        # every rank and every sharding gets the same numbers.
        if tensor.is_meta or fill_adapter_(name, tensor, seed):
            return
        name = self._tied.get(self._hf_name(name), self._hf_name(name))
        if self._checkpoint is not None:
            read_safetensor_into(*self._where(name), tensor)
            return
        if name in self._norm_params:
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            tensor.zero_()
        else:
            std = getattr(self.args.config, "initializer_range", 0.02)
            if name.endswith(RESIDUAL_PROJECTIONS):
                std /= math.sqrt(2 * self.args.n_layers)
            tensor.normal_(0.0, std, generator=seeded_generator(name, seed, tensor.device))

    def load_pretrained_(self, name: str, target: torch.Tensor) -> bool:
        # A sharded strategy's materialize: fills target (the parameter's DTensor) from name_or_path's weights,
        # reading this rank's rows only. False when there is nothing to read (no weights there, or an adapter).
        if self._checkpoint is None or LORA_A in name or LORA_B in name:
            return False
        name = self._tied.get(self._hf_name(name), self._hf_name(name))
        read_safetensor_into(*self._where(name), target)
        return True

    def _where(self, name: str) -> tuple[Path, str]:
        # -> (the safetensors file, the key) of a parameter's pretrained tensor.
        prefix = f"{self.hf.base_model_prefix}."
        # Base-model checkpoints (GPT-2's own) name tensors without the causal-LM wrapper's prefix.
        key = name if name in self._checkpoint else name.removeprefix(prefix)
        if key not in self._checkpoint:
            raise ValueError(f"{self.args.name_or_path} has no tensor {name!r} for this model")
        return self._checkpoint[key], key

    @torch.no_grad()
    def init_weights(self, seed: int, buffer_device: torch.device | None = None) -> None:
        for name, p in self.named_parameters():
            self.fill_param_(name, p.data, seed)
        self.reset_buffers(buffer_device)

    def reset_buffers(self, device: torch.device | None = None) -> None:
        # After to_empty() the buffers (RoPE inv_freq) hold garbage: transformers' own _init_weights
        # recomputes them, module by module; modules holding parameters too are left to fill_param_.
        device = self.hf.get_input_embeddings().weight.device if device is None else device
        with torch.no_grad():
            for module in self.hf.modules():
                names = [name for name, _ in module.named_buffers(recurse=False)]
                if not names or any(True for _ in module.parameters(recurse=False)):
                    continue
                self.hf._init_weights(module)
                for name in names:  # where compute runs, even when FSDP offloads the parameters to the CPU
                    module._buffers[name] = module._buffers[name].to(device)
