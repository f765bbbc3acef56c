"""The training configuration: one dataclass, from which the CLI flags are generated.

Defaults follow the released CleaR code where it fixes them (r 4, lora_alpha 1, gamma 0.85,
warm-up 3 epochs, 2 ensemble passes, consistency weight 1, temperature 1, batch 32); the
learning rates and epochs are this project's choice (see README, "Defaults").
"""
import argparse
import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .noise import NOISE_TYPES

METHODS = ("clear-lora", "lora", "full", "oracle-lora")
ROUTED_METHODS = ("clear-lora", "oracle-lora")  # those that route by a clean probability (or the truth)
EVAL_ROUTING = ("all-on", "stochastic")
HEAD_ROUTING = ("all", "routed")
CLEAN_PROB_SOURCES = ("pass", "train-steps")
KEEP_MODEL = ("last", "best-dev")
GIVE_A_DEV_SPLIT = "give --dev-file, or --dev-fraction to hold one out of the training set"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Learning rates chosen per method family (see README "Defaults"); --learning-rate overrides.
DEFAULT_LR = {"clear-lora": 1e-2, "lora": 1e-2, "oracle-lora": 1e-2, "full": 3e-4}
DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")  # what Run's device pick handles


class UserError(ValueError):
    """A mistake the user can fix (a flag, a file, a folder): the CLI prints it as one message
    with exit status 2, not as a traceback."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data
    dataset: str = _f("banking77", "built-in dataset name (banking77, clinc150, hwu64, stackoverflow, "
                      "20newsgroups, yahoo, dbpedia) or a Hugging Face dataset name")
    train_file: str = _f(None, "local CSV / TSV / JSON lines training file (replaces --dataset)")
    dev_file: str = _f(None, "optional local dev file")
    dev_fraction: float = _f(0.0, "for data without a dev split: hold out this stratified, seeded fraction of "
                             "the whole training set (before --max-train-samples) as the dev split, its "
                             "labels as given (noise goes into the rest; --max-eval-samples caps it; 0 = none)")
    test_file: str = _f(None, "local test file (required with --train-file)")
    text_column: str = _f("text", "text column of local files")
    label_column: str = _f("label", "label column of local files")
    max_train_samples: int = _f(None, "stratified, seeded subset of the training set (0 = all) (default: 2000 "
                                "on a built-in dataset, all of your own files or a hub dataset)")
    max_eval_samples: int = _f(0, "stratified, seeded subset of dev and test (0 = all)")
    data_seed: int = _f(0, "seed of the training / evaluation subsets (the same for every method)")
    # label noise
    noise_type: str = _f(None, "label noise injected for experiments: none | symmetric | symmetric-exact | "
                         "asymmetric | asymmetric-next | instance (conventions in README) (default: symmetric on "
                         "a built-in dataset or with --noise-rate; none on your own files or a hub dataset, "
                         "whose labels are used as they are)")
    noise_rate: float = _f(None, "label noise rate r in [0, 1) (default: 0.4 when noise is injected)")
    noise_seed: int = _f(None, "seed of the injected noise (default: --seed)")
    # model and method
    model: str = _f(DEFAULT_MODEL, "Hugging Face encoder name or local folder")
    max_length: int = _f(64, "maximum tokens per text")
    method: str = _f("clear-lora", "clear-lora | lora | full | oracle-lora")
    r: int = _f(4, "LoRA rank")
    lora_alpha: float = _f(1.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: list = _f(None, "names of the linear modules that get LoRA (default: peft's choice for "
                              "the model type, e.g. query value for BERT / RoBERTa, q_lin v_lin for "
                              "DistilBERT)", nargs="+")
    gamma: float = _f(0.85, "routing cap: a sample passes layer l's adapters w.p. gamma * p_clean")
    warmup_epochs: int = _f(3, "epochs of plain cross-entropy with module dropout gamma before routing")
    ensemble_passes: int = _f(2, "stochastic forward passes averaged in the clean-probability pass")
    consistency_weight: float = _f(1.0, "lambda of the consistency loss (0 turns it off)")
    temperature: float = _f(1.0, "temperature T of the consistency loss")
    normalize_losses: bool = _f(False, "min-max normalise losses before the mixture (DivideMix); "
                                "released code: raw")
    classwise_losses: bool = _f(False, "subtract each observed class's median loss before the mixture "
                                "(deviation; released: one mixture over all losses as they are)")
    clean_prob_source: str = _f("pass", "pass (released: a no-grad pass each epoch) | train-steps "
                                "(deviation: losses recorded during the previous epoch's steps)")
    head_routing: str = _f("all", "all (released: the head trains on every sample) | routed (after warm-up, "
                           "a sample updates the head only w.p. gamma * p_clean, like one more layer)")
    eval_routing: str = _f("all-on", "all-on (every adapter on) | stochastic (released: each w.p. gamma)")
    # optimisation
    learning_rate: float = _f(None, "AdamW learning rate (default per method: LoRA 1e-2, full 3e-4)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    num_epochs: int = _f(6, "training epochs (warm-up included)")
    batch_size: int = _f(32, "training batch size")
    eval_batch_size: int = _f(128, "batch size of no-grad passes")
    pad_to_multiple_of: int = _f(1, "pad each batch's length up to a multiple of this, at most --max-length "
                                 "(1: to its longest text): a few batch shapes instead of one per length, for "
                                 "--compile-mode reduce-overhead, which records a CUDA graph per shape; results "
                                 "equal up to rounding")
    shared_prefix_pass: bool = _f(True, "run the clean-probability pass's ensemble passes as one batch that "
                                  "computes a sample's layers in pass e > 0 only from the first layer whose "
                                  "mask differs from pass 0's (same masks and logits as separate passes up "
                                  "to rounding; ensemble_passes x eval_batch_size rows per forward)")
    seed: int = _f(0, "seed of initialisation, data order and routing")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    bf16: bool = _f(False, "bf16 autocast (for GPUs; on the CPU it runs torch's CPU autocast, which changes "
                    "the numbers and is fast only on CPUs with bf16 units)")
    tf32: bool = _f(False, "TF32 tensor cores for float32 matrix products on a GPU (torch's float32 matmul "
                    "precision 'high', the routed kernels too): faster fp32 steps, products rounded to "
                    "about 1e-3; no effect on the CPU")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: str = _f("default", "torch.compile mode with --compile: default | reduce-overhead (CUDA "
                           "graphs on a GPU: a step's kernels replayed without the host launching each) | "
                           "max-autotune | max-autotune-no-cudagraphs")
    # output
    output_dir: str = _f("runs/default", "where outputs go")
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    resume: bool = _f(False, "continue the run in --output-dir from its last checkpoint")
    save_adapter: bool = _f(True, "save the trained adapter and head (peft format; the model itself for "
                            "--method full)")
    keep_model: str = _f("last", "the model saved: last (after the last epoch) | best-dev (after the epoch of "
                         "best dev accuracy, the first of ties, as results.json's dev_selected_test_accuracy; "
                         "needs a dev split)")
    plots: bool = _f(True, "write PNG plots")
    progress: bool = _f(True, "progress bars")

    @property
    def lr(self):
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]

    @property
    def effective_noise_seed(self):
        return self.seed if self.noise_seed is None else self.noise_seed

    def to_dict(self):
        d = dataclasses.asdict(self)
        if d["target_modules"] is not None:
            d["target_modules"] = list(d["target_modules"])
        return d

    @property
    def injects_noise(self):
        return self.noise_type != "none" and self.noise_rate > 0

    def fill_defaults(self):
        """Injected noise and a small training subset are for experiments on benchmark data: the
        defaults on a built-in dataset only, never silently on the user's own data (files, hub datasets)."""
        from .data import BUILTIN_DATASETS

        builtin = not self.train_file and str(self.dataset).lower() in BUILTIN_DATASETS
        filled = [name for name in ("max_train_samples", "noise_type", "noise_rate") if getattr(self, name) is None]
        if self.max_train_samples is None:
            self.max_train_samples = 2000 if builtin else 0
        if self.noise_type is None:
            self.noise_type = "symmetric" if builtin or self.noise_rate is not None else "none"
        if self.noise_rate is None:
            self.noise_rate = 0.0 if self.noise_type == "none" else 0.4
        # Not a field (not saved): --resume takes these from the run it continues, which an older
        # version made with other defaults (2000 samples, symmetric 0.4, on any data).
        self.defaulted = getattr(self, "defaulted", ()) or tuple(filled)
        return self

    @classmethod
    def saved_with_defaults(cls, saved):
        """A config dict saved by an earlier version, with the options it predates at their defaults
        (the run was made with them)."""
        return {**cls().to_dict(), **saved}

    def validate(self):
        """Fill in the defaults that depend on other settings; raise ValueError naming every bad
        setting at once."""
        self.fill_defaults()
        bad = []
        if self.method not in METHODS:
            bad.append(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.eval_routing not in EVAL_ROUTING:
            bad.append(f"--eval-routing {self.eval_routing!r} is not one of {', '.join(EVAL_ROUTING)}")
        if self.head_routing not in HEAD_ROUTING:
            bad.append(f"--head-routing {self.head_routing!r} is not one of {', '.join(HEAD_ROUTING)}")
        if self.compile_mode not in COMPILE_MODES:
            bad.append(f"--compile-mode {self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        if self.clean_prob_source not in CLEAN_PROB_SOURCES:
            bad.append(f"--clean-prob-source {self.clean_prob_source!r} is not one of "
                       f"{', '.join(CLEAN_PROB_SOURCES)}")
        if self.noise_type not in NOISE_TYPES:
            bad.append(f"--noise-type {self.noise_type!r} is not one of {', '.join(NOISE_TYPES)}")
        if not DEVICES.fullmatch(self.device):
            bad.append(f"--device {self.device!r} is not one of auto, cpu, cuda, cuda:N (N: a GPU number)")
        if not 0.0 <= self.noise_rate < 1.0:
            bad.append(f"--noise-rate must be in [0, 1), got {self.noise_rate}")
        for name in ("batch_size", "eval_batch_size", "num_epochs", "r", "max_length", "ensemble_passes",
                     "pad_to_multiple_of"):
            if getattr(self, name) < 1:
                bad.append(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_epochs", "max_train_samples", "max_eval_samples"):
            if getattr(self, name) < 0:
                bad.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.gamma <= 1.0:
            bad.append(f"--gamma must be in (0, 1], got {self.gamma}")
        if self.temperature <= 0:
            bad.append(f"--temperature must be > 0, got {self.temperature}")
        if self.consistency_weight < 0:
            bad.append(f"--consistency-weight must be >= 0, got {self.consistency_weight}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            bad.append(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.weight_decay >= 0:
            bad.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        model_dir = Path(self.model)
        if model_dir.is_dir() and not (model_dir / "config.json").is_file():
            bad.append(f"--model {self.model!r} is a folder without config.json: name a folder saved by "
                       "save_pretrained (config.json, weights and tokenizer files) or a model name")
        if not 0.0 <= self.dev_fraction < 1.0:
            bad.append(f"--dev-fraction must be in [0, 1), got {self.dev_fraction}")
        elif self.dev_fraction and self.dev_file:
            bad.append("--dev-fraction holds out a dev split for data without one: drop it or --dev-file")
        if self.train_file and not self.test_file:
            bad.append("--train-file needs --test-file")
        if self.overwrite and self.resume:
            bad.append("--overwrite and --resume contradict each other: choose one")
        if self.keep_model not in KEEP_MODEL:
            bad.append(f"--keep-model {self.keep_model!r} is not one of {', '.join(KEEP_MODEL)}")
        elif self.keep_model == "best-dev" and not self.save_adapter:
            bad.append("--keep-model best-dev with --no-save-adapter keeps nothing: drop one of them")
        elif self.keep_model == "best-dev" and self.train_file and not (self.dev_file or self.dev_fraction):
            bad.append(f"--keep-model best-dev needs a dev split: {GIVE_A_DEV_SPLIT}")
        if bad:
            raise UserError("invalid configuration:\n  " + "\n  ".join(bad))
        if self.method in ROUTED_METHODS and self.warmup_epochs >= self.num_epochs:
            warnings.warn(f"--method {self.method} with --warmup-epochs {self.warmup_epochs} >= --num-epochs "
                          f"{self.num_epochs}: every epoch is warm-up, nothing is routed by clean "
                          "probability", UserWarning, stacklevel=2)
        return self


def _field_type(f):
    # a string under `from __future__ import annotations`
    return {"bool": bool, "int": int, "float": float, "str": str, "list": list}.get(f.type, f.type)


def _default_text(f):
    """A flag's default as --help shows it: the TrainConfig default (argparse's are None so that a
    config file can fill what the command line leaves out); None defaults are explained in the help."""
    if f.default is None:
        return ""
    if isinstance(f.default, bool):
        return f" (default: {'on' if f.default else 'off'})"
    return f" (default: {f.default})"


def version_string():
    import clear_fast

    return f"clear_fast {clear_fast.__version__}"


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m clear_fast.train",
        description="CleaR (Clean Routing) fine-tuning on noisy labels, with plain LoRA and full "
                    "fine-tuning baselines. Runs offline on banking77 with MiniLM by default.")
    p.add_argument("--version", action="version", version=version_string())
    p.add_argument("--config", help="JSON or YAML file holding any of these flags (the command line wins)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"] + _default_text(f)
        if _field_type(f) is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            typ = {int: int, float: float}.get(_field_type(f), str)
            kw = {"nargs": f.metadata["nargs"]} if "nargs" in f.metadata else {}
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=help_, **kw)
    return p


_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def _coerce(value, typ, optional):
    """value as a config-file value of a field of type typ; raises TypeError when it is not one.
    YAML 1.1 (PyYAML) reads 1e-3 as a string and JSON has no way to say "float", hence the strings."""
    if value is None and optional:
        return None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise TypeError("true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise TypeError("an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise TypeError("a number") from None
        else:
            raise TypeError("a number")
        if not math.isfinite(number):
            raise TypeError("a finite number")
        return number
    if typ is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise TypeError("a list of names (or one name)")
    if isinstance(value, str):
        return value
    raise TypeError("a string")


def _checked_file_values(values, path):
    """The config file's values coerced to the fields' types; every bad one named in one error."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields.keys())
    if unknown:
        raise UserError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                        "`python -m clear_fast.train --help` lists them (as --flag-names)")
    out, bad = {}, []
    for key, value in values.items():
        f = fields[key]
        try:
            out[key] = _coerce(value, _field_type(f), optional=f.default is None)
        except TypeError as expected:
            bad.append(f"{key}: {value!r} is not {expected}")
    if bad:
        raise UserError(f"config file {path}: wrong type of value:\n  " + "\n  ".join(bad))
    return out


def load_config_file(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UserError(f"config file {path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    return data


def parse_config(argv=None):
    """Defaults < --config file < command line."""
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    values = {}
    if config_path:
        raw = load_config_file(config_path)
        values = _checked_file_values({str(k).replace("-", "_"): v for k, v in raw.items()}, config_path)
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values).validate()
