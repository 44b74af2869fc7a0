"""Typed configuration of a distillation run: one schema, YAML in, YAML out.

Every section is a pydantic model that rejects unknown keys, so a typo in a
recipe fails before any work starts, with the key path named.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from distill.core.units import duration_seconds, nearest, parse_count, positive_duration

# The names the schema accepts for train.loss and evaluate.tasks. The parts that implement them
# (distill.losses.LOSSES, distill.evaluate.tasks) check at import that they have exactly these.
LOSS_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "total_variation")
TASK_NAMES = ("arithmetic", "algebra", "humaneval")


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DtypeSetting = Literal["auto", "float32", "bfloat16"]


_AUTO_DTYPE = (
    "auto: bf16 on a GPU that supports it; on a CPU whichever of bf16 and fp32 ran the model's "
    "matmuls faster in a short probe (bf16 pays only with AMX; elsewhere it is ~25-75x slower)"
)


class DataConfig(_Strict):
    """Where prompts come from and how they are split."""

    path: str | None = Field(
        None, description="JSONL / TXT / CSV / Parquet file of prompts; None = embedded default set"
    )
    format: Literal["auto", "jsonl", "txt", "csv", "parquet"] = "auto"
    max_prompts: int | None = Field(None, ge=1, description="keep at most this many prompts")
    heldout_size: int = Field(32, ge=1, description="prompts held out for evaluation")
    split_seed: int = 0
    system_prompt: str | None = Field(None, description="system message prepended when the prompt has none")
    max_prompt_tokens: int = Field(256, ge=8, description="longer prompts are left-truncated")


class ModelConfig(_Strict):
    """A model: a bundled name, a Hugging Face folder, or a .gguf file."""

    model: str = "smollm2-135m-instruct"
    dtype: DtypeSetting = Field(
        "auto",
        description="dtype for generating answers and scoring the cache; " + _AUTO_DTYPE + ". bf16 "
        "greedy answers can change with batch padding, so evaluation compares with the stored answers",
    )
    trust_remote_code: bool = False


class PriceConfig(_Strict):
    """What one million tokens cost, in US dollars."""

    prompt: float = Field(0.0, ge=0)
    completion: float = Field(0.0, ge=0)


class ApiConfig(_Strict):
    """A black-box teacher behind an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama)."""

    base_url: str = Field("http://127.0.0.1:8080/v1", description="the endpoint, up to and including /v1")
    model: str = Field("default", description="model name the server expects")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="NAME of the environment variable that holds the key (never the key itself); "
        "None for servers without keys",
    )
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat: send messages; completions: send the prompt rendered by our chat template"
    )
    n: int = Field(1, ge=1, description="answers per prompt (each its own request, seed + sample index)")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] | None = None
    top_logprobs: int = Field(0, ge=0, le=20, description="top log-probs per token (0 = text only)")
    seed: int | None = Field(0, description="sent to servers that accept a seed; sample j gets seed + j")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    requests_per_min: float | None = Field(None, gt=0, description="client-side rate limit")
    tokens_per_min: float | None = Field(None, gt=0, description="client-side limit on prompt + completion")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_s: float = Field(1.0, gt=0, description="first retry delay; doubles each retry, with jitter")
    max_backoff_s: float = Field(60.0, gt=0)
    prices: dict[str, PriceConfig] = Field(
        default_factory=dict, description="per-model prices, USD per 1M tokens; unknown models cost 0"
    )

    @field_validator("api_key_env")
    @classmethod
    def _looks_like_a_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(
                "must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not a key; "
                "export the key in that variable"
            )
        return v


class TeacherConfig(ModelConfig):
    """The teacher: a local model (transformers or llama.cpp), or an OpenAI-compatible API.

    With ``kind: openai`` the ``model`` field names an optional local copy with the same
    tokenizer (for shrinking a student and for KL in evaluation); set it to null when there is none.
    """

    kind: Literal["local", "openai"] = "local"
    model: str | None = "smollm2-135m-instruct"  # type: ignore[assignment]
    engine: Literal["transformers", "llama_cpp"] = Field(
        "transformers", description="local generation engine; llama_cpp needs a .gguf model"
    )
    api: ApiConfig = ApiConfig()
    device: str = Field(
        "auto",
        description="where the teacher runs: auto (the first GPU, else the CPU), cpu, cuda, cuda:1, ...",
    )
    device_map: Literal["auto"] | None = Field(
        None, description="auto: spread a teacher too large for one GPU over every GPU (and the CPU)"
    )

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _local_needs_model(self) -> TeacherConfig:
        if self.kind == "local" and not self.model:
            raise ValueError("teacher.model must be set when teacher.kind is 'local'")
        return self


class FilterConfig(_Strict):
    """Which teacher answers are kept for training (rejection sampling)."""

    finish_reasons: list[str] | None = Field(
        None, description="keep only answers that ended so, e.g. [stop]; None keeps all"
    )
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, ge=1)
    dedupe: bool = Field(True, description="drop a second identical answer to the same prompt")
    verify: Literal["none", "number", "regex"] = Field(
        "none",
        description="number: the answer's last number must equal the prompt's reference; "
        "regex: the answer must match the prompt's reference as a regular expression",
    )
    verify_choices: bool = Field(False, description="a prompt with 'choices': keep an answer that names "
                                 "exactly one of them (its reference, if any)")  # fmt: skip


class GenerateConfig(_Strict):
    """How the teacher answers prompts."""

    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    do_sample: bool = False
    generation_temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    extra_samples: int = Field(0, ge=0, le=16, description="answers sampled per training prompt beside the "
                               "first, at generation_temperature and top_p (a local teacher)")  # fmt: skip
    resample: int = Field(0, ge=0, le=16, description="more answers sampled, one a round, for a training "
                          "prompt until one passes `filter` (a local teacher)")  # fmt: skip


class StudentConfig(_Strict):
    """The student: shrunk from the teacher, or any model with the same tokenizer."""

    init: Literal["shrink", "model"] = "shrink"
    model: str | None = Field(None, description="bundled name / HF folder / .gguf when init=model")
    num_layers: int = Field(10, ge=1, description="decoder layers kept when init=shrink")
    layers: list[int] | None = Field(
        None, description="explicit teacher layer indices to keep (overrides num_layers)"
    )
    layer_selection: Literal["even", "importance"] = Field(
        "even",
        description="which num_layers layers to keep: evenly spaced (first and last included), or the "
        "most important by block importance (mean 1 - cos(input, output)) on calibration sequences",
    )
    calibration_samples: int = Field(
        48, ge=1, description="teacher answers used to score layers and compare candidate students"
    )
    num_heads: int | None = Field(
        None, ge=1, description="attention (query) heads kept per layer, the most important by activation "
        "(Minitron width pruning; a multiple of the key/value heads); None: all",
    )  # fmt: skip
    intermediate_size: int | None = Field(
        None, ge=1, description="MLP channels kept per layer, the most important by activation; None: all"
    )
    hidden_size: int | None = Field(
        None, ge=8, description="residual-stream (embedding) channels kept, the most active at every "
        "RMSNorm's output (Minitron); Llama-type students; None: all",
    )  # fmt: skip
    target_params: str | None = Field(
        None, description="search the student's shape: e.g. 70M. Every (depth, heads, MLP width) of the "
        "grid that fits is built by importance, scored untrained (KL, top-1) and timed; the lowest KL "
        "wins (num_layers, num_heads and intermediate_size are then chosen, not set)",
    )  # fmt: skip

    target_speedup: float | None = Field(
        None, gt=1, description="search the student's shape: at least this many times the teacher's "
        "batch-1 generation speed, measured here (with target_params too: both must hold); the lowest "
        "untrained KL of those measured fast enough wins",
    )  # fmt: skip

    @model_validator(mode="after")
    def _model_needed(self) -> StudentConfig:
        if self.init == "model" and not self.model:
            raise ValueError("student.model must be set when student.init is 'model'")
        if self.target_params is not None and parse_count(self.target_params) is None:
            raise ValueError(f"student.target_params {self.target_params!r}: a count such as 70M or 1.5B")
        if self.target_params is not None or self.target_speedup is not None:
            if self.layers is not None or self.num_heads or self.intermediate_size or self.hidden_size:
                raise ValueError("student.target_params / target_speedup search the shape: set layers, "
                                 "num_heads, intermediate_size and hidden_size to null")  # fmt: skip
        return self


class LoraConfig(_Strict):
    """Train low-rank adapters (PEFT LoRA) instead of every weight; merged into the student on save."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names that get adapters",
    )


class TrainConfig(_Strict):
    """The training recipe: loss = alpha * KD + (1 - alpha) * CE on teacher tokens."""

    loss: str = Field("forward_kl", description="a key of distill.losses.LOSSES")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term (1 - alpha weighs the CE term)")
    distill_temperature: float = Field(1.0, gt=0, le=100, description="softmax temperature of the KD term")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="loss jsd: the mixture weight beta of the teacher")
    skew: float = Field(
        0.1, ge=0, lt=1, description="loss skew_forward_kl / skew_reverse_kl: the skew coefficient"
    )
    hidden_weight: float = Field(
        0.0, ge=0, description="weight of a hidden-state alignment term: each student layer's output "
        "against its teacher layer's (the layers a shrunk student kept, else spread evenly), through a "
        "learned projection when the widths differ; needs a live teacher",
    )  # fmt: skip
    prompt_weight: float = Field(
        0.0, ge=0, description="weight of a KD term on the prompt's tokens too (the teacher's signal "
        "there comes with the same forward pass; no CE on them; needs a live teacher)",
    )  # fmt: skip
    hidden_loss: Literal["cosine", "mse"] = Field("cosine", description="the hidden-state alignment distance")
    cross_tokenizer: Literal["off", "uld", "span"] = Field(
        "off", description="logit-level KD between different tokenizers (distill audit says which pair is "
        "which): uld (sorted probabilities, Universal Logit Distillation) or span (alignment by character "
        "spans, KL on the tokens both vocabularies have, chunk probabilities by the chain rule)",
    )  # fmt: skip
    cross_topk: int = Field(
        128,
        ge=1,
        description="teacher probabilities kept per position for cross_tokenizer (a cache "
        "stores 6 bytes per answer token for each; span learns more from 1024, docs/crosstok.md)",
    )
    cross_chunk: Literal["bernoulli", "ce"] = Field(
        "bernoulli", description="span: how a chunk of several tokens (on either side) is taught. "
        "bernoulli: the two models' probabilities of its text compared as one event, KL(Bernoulli(p_t) || "
        "Bernoulli(p_s)) (as GOLD); ce: the cross-entropy of its text at full weight, as sequence-level KD "
        "(on sampled answers an unbiased estimate of the teacher's cross-entropy, which the Bernoulli KL "
        "under-weights by the chunk's probability)",
    )  # fmt: skip
    onpolicy_fraction: float = Field(
        0.0, ge=0, le=1, description="lambda: share of sequences whose answer the student samples itself "
        "and the teacher grades token by token (on-policy distillation, GKD); 0: off-policy only",
    )  # fmt: skip
    onpolicy_schedule: Literal["constant", "linear"] = Field(
        "constant", description="lambda constant, or rising linearly from 0 to onpolicy_fraction"
    )
    onpolicy_loss: str = Field("jsd", description="the divergence on the student's own tokens (no CE term)")
    onpolicy_temperature: float = Field(1.0, gt=0, le=10, description="the student's sampling temperature")
    onpolicy_max_new_tokens: int = Field(64, ge=1, description="longest answer the student samples")
    time_budget: str | None = Field(
        None,
        description="wall time for training, e.g. 10m: the step time is measured after warm-up and "
        "the step count set to fit (max_steps stays the upper bound); None: max_steps steps",
    )
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    lr_schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="after warm-up: "
        "cosine decay to 10% of lr at max_steps; wsd: held, then linear to 10% in the last 20%")  # fmt: skip
    max_steps: int = Field(120, ge=1)
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(384, ge=8)
    grad_clip: float | None = Field(1.0, gt=0)
    dtype: DtypeSetting = Field(
        "auto",
        description="bfloat16: bf16 autocast for forward passes (fp32 master weights); float32: none; "
        + _AUTO_DTYPE,
    )
    freeze_embeddings: bool = Field(False, description="keep the token embeddings and LM head as the student "
        "started (unused words keep the teacher's vectors; no head weight gradient)")  # fmt: skip
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    chunked_loss: bool = Field(
        True, description="compute the loss from hidden states block by block: no (B, T, V) logits"
    )
    fused_loss: bool = Field(
        True,
        description="forward_kl + CE with a dense teacher: loss and gradient in closed form, fused "
        "per block by torch.compile (several times faster than eager ops; falls back to them)",
    )
    packing: bool = Field(False, description="pack each micro-batch's samples into rows of max_seq_len "
        "(attention stays inside each sample): less compute on padding")  # fmt: skip
    group_by_length: bool = Field(
        False,
        description="micro-batches of samples of similar length (sorted within 32 steps): default "
        "recipe 1.34x tokens/s, 0.83x peak RSS, but a worse student at equal steps",
    )
    tensorboard: bool = Field(True, description="also log metrics to TensorBoard when it is installed")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of full weights")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _bf16_alias(cls, data):
        """``bf16: true/false`` (older recipes) means ``dtype: bfloat16/float32``."""
        if isinstance(data, dict) and "bf16" in data:
            data = dict(data)
            flag = data.pop("bf16")
            if data.get("dtype", "auto") == "auto" and isinstance(flag, bool):
                data["dtype"] = "bfloat16" if flag else "float32"
            elif not isinstance(flag, bool):
                data["bf16"] = flag  # let the schema report it
        return data

    @field_validator("loss", "onpolicy_loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in LOSS_NAMES:
            raise ValueError(f"unknown loss{nearest(v, LOSS_NAMES)}; one of {', '.join(LOSS_NAMES)}")
        return v

    @field_validator("time_budget")
    @classmethod
    def _a_duration(cls, v: str | None) -> str | None:
        return positive_duration(v)

    @property
    def bf16(self) -> bool:
        """bf16 autocast on (``dtype`` resolved from ``auto`` first: see ``distill.core.hardware``)."""
        if self.dtype == "auto":
            raise ValueError(
                "train.dtype is still 'auto': resolve it with distill.stages.run_folder.resolve_precision"
            )
        return self.dtype == "bfloat16"

    @property
    def time_budget_s(self) -> float | None:
        return None if self.time_budget is None else duration_seconds(self.time_budget)


class CacheConfig(_Strict):
    """Offline teacher signal: the teacher's top-k log-probs stored once, then training without it."""

    use: bool = Field(False, description="train from the cache (teacher never loaded) instead of live logits")
    k: int = Field(32, ge=1, description="top-k token ids and log-probs kept per position")
    scoring_temperature: float = Field(1.0, gt=0, description="teacher softmax temperature when scoring")
    samples_per_shard: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    tail: Literal["auto", "sample", "bucket", "renormalize"] = Field(
        "auto",
        description="mass outside the top-k: stood for by the cached tail samples (sample; forward_kl "
        "only), one extra outcome on both sides (bucket), or dropped and the k renormalised; sample "
        "and bucket need train.distill_temperature=1. auto: the first of these the run allows",
    )
    tail_samples: int = Field(
        4, ge=0, description="ids drawn per position from the teacher's mass outside the top-k and "
        "cached with their log-probs (4 bytes each); what cache.tail: sample trains on",
    )  # fmt: skip


class HealConfig(_Strict):
    """An optional first training stage on general text, before the task data: distillation (or,
    without a live teacher, plain language modelling) on every token, to heal a pruned student."""

    data: str | None = Field(
        None, description="None: no healing stage; 'default': the bundled general text (English "
        "conversations from chatterbot-corpus, BSD-3-Clause); or a .txt (documents separated by blank "
        "lines) / .jsonl (a \"text\" field per line) file",
    )  # fmt: skip
    max_steps: int = Field(40, ge=1, description="the upper bound on healing steps")
    time_budget: str | None = Field(None, description="wall time for healing, e.g. 2m (as train.time_budget)")
    lr: float | None = Field(None, gt=0, description="None: train.lr")

    @field_validator("time_budget")
    @classmethod
    def _a_duration(cls, v: str | None) -> str | None:
        return positive_duration(v)


class EvaluateConfig(_Strict):
    """Held-out evaluation and speed measurement."""

    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(16, ge=1)
    speed_new_tokens: int = Field(48, ge=1, description="tokens generated per speed measurement")
    speed_batch_size: int = Field(8, ge=1)
    speed_repeats: int = Field(3, ge=1)
    speed_dtype: DtypeSetting = Field(
        "auto", description="dtype the speed is measured in (the one you would deploy); " + _AUTO_DTYPE
    )
    # peak resident memory of each model answering one prompt, each in a fresh process (a few s each)
    measure_memory: bool = True
    # price of an hour of the machine that serves the student, in USD: the report's cost per
    # million generated tokens (null: not shown; `distill report --price-per-hour` sets it later)
    price_per_hour: float | None = Field(None, gt=0)
    bootstrap_draws: int = Field(2000, ge=100, description="resamples of the held-out prompts per interval")
    # tasks with reference answers, beside the held-out prompts: arithmetic, algebra, humaneval
    # (built in) or JSONL files whose prompts have a `reference`
    tasks: list[str] = Field(default_factory=list)
    task_size: int | None = Field(100, ge=1, description="first N items of each task (null: all)")
    task_max_new_tokens: int = Field(48, ge=1, description="answer length for tasks with reference answers")
    code_max_new_tokens: int = Field(320, ge=1, description="answer length for humaneval")
    code_timeout: float = Field(10.0, gt=0, description="seconds each humaneval program may run")
    unsafe_code: bool = Field(
        False,
        description="run humaneval programs without a sandbox where bubblewrap cannot make one "
        "(they can then read and write your files and reach the network)",
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        for spec in v:
            if spec not in TASK_NAMES and not spec.endswith(".jsonl"):
                near = difflib.get_close_matches(spec, TASK_NAMES, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                known = ", ".join(TASK_NAMES)
                raise ValueError(f"{spec!r} is neither a built-in task ({known}) nor a .jsonl file{hint}")
        if len(set(v)) != len(v):
            raise ValueError("a task is listed twice")
        return v


class ExportConfig(_Strict):
    """What ``distill export`` writes into export/, and how it checks it."""

    dtype: Literal["float32", "bfloat16"] = "float32"  # of the Hugging Face folder's weights
    formats: list[Literal["hf", "gguf"]] = Field(default_factory=lambda: ["hf", "gguf"], min_length=1)
    gguf_types: list[Literal["f16", "q8_0", "q4_0"]] = Field(
        default_factory=lambda: ["f16", "q8_0"], min_length=1
    )
    # held-out prompts on which each exported file is compared with the evaluated student (0: none)
    check_prompts: int = Field(8, ge=0)
    check_new_tokens: int = Field(32, ge=1)


class RunConfig(_Strict):
    """A whole distillation run; written resolved into the run folder."""

    name: str = "default"
    runs_dir: str = "runs"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = all cores")
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    heal: HealConfig = HealConfig()
    cache: CacheConfig = CacheConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        """The run folder is runs_dir/name: a name with a path in it would write outside runs_dir."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or v in (".", ".."):
            raise ValueError(f"{v!r}: a run name is one folder name (letters, digits, . _ -), no path")
        return v

    @model_validator(mode="after")
    def _api_needs_a_tokenizer(self) -> RunConfig:
        if self.teacher.kind == "openai" and not self.teacher.model and self.student.init == "shrink":
            raise ValueError(
                "teacher.kind 'openai' with no local teacher.model: set student.init=model and "
                "student.model (the student's tokenizer encodes the answers), or name a local copy "
                "of the teacher in teacher.model to shrink from"
            )
        return self

    @model_validator(mode="after")
    def _extra_samples_from_a_local_teacher(self, info: ValidationInfo) -> RunConfig:
        """An API teacher: a recipe's ``extra_samples`` or ``resample`` set to 0 (a note), an explicit one
        refused."""
        explicit = (info.context or {}).get("explicit")
        why = "an API teacher's answers per prompt are teacher.api.n"
        for key in ("extra_samples", "resample"):
            if getattr(self.generate, key) and self.teacher.kind == "openai":
                if explicit is None or _set_in(f"generate.{key}", explicit):
                    raise ValueError(f"generate.{key} is for a local teacher; {why}")
                info.context.setdefault("notes", []).append(f"generate.{key} -> 0: {why}")
                setattr(self.generate, key, 0)
        return self

    @model_validator(mode="after")
    def _tail_samples_fit_the_loss(self) -> RunConfig:
        if self.cache.tail == "sample":
            if not self.cache.tail_samples:
                raise ValueError("cache.tail 'sample' needs cache.tail_samples > 0 (e.g. 4)")
            if self.train.loss != "forward_kl" or self.train.distill_temperature != 1.0:
                raise ValueError(
                    "cache.tail 'sample' estimates the forward KL at temperature 1: set "
                    "train.loss=forward_kl and train.distill_temperature=1, or use cache.tail=bucket"
                )
        if self.cache.tail in ("sample", "bucket") and self.cache.scoring_temperature != 1.0:
            raise ValueError(
                f"cache.tail '{self.cache.tail}' needs cache.scoring_temperature=1 (the tail mass is "
                "known only at the temperature it was scored at); use cache.tail=renormalize"
            )
        return self

    @model_validator(mode="after")
    def _live_teacher_options(self, info: ValidationInfo) -> RunConfig:
        """On-policy rows need a teacher that grades given tokens, hidden-state alignment one whose
        layers can be read: a local teacher run live, not a cache or an API.

        A value the recipe set follows the teacher signal: turned off, with a line in
        ``info.context["notes"]``, when the signal cannot serve it. A value set on the command line
        (every key in ``info.context["explicit"]``; every value when there is no context) is refused.
        """
        if not (self.cache.use or self.teacher.kind == "openai"):
            return self
        context = info.context or {}
        explicit, notes = context.get("explicit"), context.get("notes", [])
        signal = "the cache" if self.cache.use else "an API teacher"
        # the cache serves the off-policy rows; a local teacher.model grades the samples live,
        # or an API teacher through completions with echo and logprobs
        api = self.teacher.api
        graded = (self.teacher.kind == "local" and bool(self.teacher.model)) or (
            self.teacher.kind == "openai" and api.endpoint == "completions" and api.top_logprobs > 0
        )
        need = {
            "onpolicy_fraction": "a teacher that grades the student's samples",
            "hidden_weight": "a live local teacher",
            "prompt_weight": "a live local teacher",
        }
        for key, teacher in need.items():
            value = getattr(self.train, key)
            if value <= 0 or (key == "onpolicy_fraction" and graded):
                continue
            path = f"train.{key}"
            if explicit is not None and not _set_in(path, explicit):
                setattr(self.train, key, 0.0)
                notes.append(f"{path} {value} -> 0: needs {teacher}; the teacher signal is {signal}")
            elif key == "onpolicy_fraction":
                raise ValueError(
                    "train.onpolicy_fraction needs a teacher that grades the student's samples: a local "
                    "teacher.model, or an API teacher with teacher.api.endpoint=completions and "
                    "teacher.api.top_logprobs > 0 (a server that echoes the log-probs of given tokens, "
                    "as vLLM does)"
                )
            else:
                why = "for its hidden states" if key == "hidden_weight" else "to score the prompt's tokens"
                fix = "cache.use=false" if self.cache.use else "teacher.kind=local"
                raise ValueError(
                    f"train.{key} needs a live local teacher {why}; the teacher signal is {signal}, "
                    f"which has none: set {fix}, or train.{key}=0"
                )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _set_in(path: str, keys: set[str]) -> bool:
    """Whether ``path`` (``train.hidden_weight``) or a section above it (``train``) is in ``keys``."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))
