"""`python -m clear_fast.experiments`: run a grid of training runs, then `... report` to aggregate them.

A grid (YAML or JSON, experiments/grid.yaml by default) is methods x datasets x noise settings x
seeds, with flags of `python -m clear_fast.train` shared by every run, per dataset, per method and per
variant (a named set of extra flags on a method, e.g. ``clear-lora[gamma=0.7]``, which is a method
of its own in the table). Each run is one training subprocess (memory stays isolated and Ctrl-C
leaves a resumable checkpoint) writing to <work_dir>/<run-name>; its small result files are then
copied to <results_dir>/<run-name>/ and, with --commit, committed, so the grid continues later from
where it stopped, on any machine. Run names are readable and deterministic:
``banking77__symmetric0.4__clear-lora__seed0``.

The report groups every run under a results folder by dataset x noise x method and gives mean and
sample standard deviation (ddof 1) over seeds of the best, last and dev-selected test accuracy and of
the final clean-detection AUROC, plus a method-versus-lora table that marks differences within one
pooled standard deviation as "within seed spread", and two plots.
"""
import argparse
import fnmatch
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import METHODS, TrainConfig, load_config_file, parse_config
from .io import read_jsonl, save_figure, write_json, write_text
from .noise import NOISE_TYPES
from .plots import _pyplot

GRID_KEYS = {"name", "description", "results_dir", "report_dir", "work_dir", "shared", "datasets", "methods",
             "variants", "noise", "seeds", "clean_seeds", "cost"}
# Flags the runner sets itself for every run; a grid may not set them.
RUNNER_FLAGS = {"output_dir", "seed", "noise_type", "noise_rate", "resume", "overwrite", "progress", "config"}
ROUTED = ("clear-lora", "oracle-lora")
ORACLE = "oracle-lora"  # needs injected noise: never run on clean data
# Seconds per batch of 32 as a + b * max_length: one run alone on a quiet 2-core CPU, MiniLM-L6,
# calibrated on the grid's own runs (docs/results.md "Time").
DEFAULT_COST = {"train_step": [0.1, 0.0056], "forward": [0.0, 0.0017], "full_factor": 1.8, "startup_s": 10.0}
RESULT_FILES = ("results.json", "metrics.jsonl")


# ============================================================================= the grid
@dataclass
class RunSpec:
    name: str  # folder name, e.g. banking77__symmetric0.4__clear-lora__seed0
    dataset: str
    noise: str  # label: none, symmetric0.4, ...
    method: str  # label in the table, e.g. clear-lora or clear-lora[gamma=0.7]
    base_method: str
    seed: int
    flags: dict  # TrainConfig names -> values, without the runner's own flags

    def argv(self, output_dir, progress=False):
        return flags_to_argv({**self.flags, "seed": self.seed, "output_dir": str(output_dir),
                              "progress": progress})

    def config(self):
        return parse_config(self.argv("unused"))


@dataclass
class Grid:
    path: Path
    name: str
    runs: list
    results_dir: Path
    report_dir: Path
    work_dir: Path
    cost: dict = field(default_factory=lambda: dict(DEFAULT_COST))


def flags_to_argv(flags):
    argv = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def noise_label(noise_type, rate):
    return "none" if noise_type == "none" else f"{noise_type}{float(rate):g}"


def slug(label):
    """A method label as a folder-name part: clear-lora[gamma=0.7] -> clear-lora+gamma=0.7."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "+", label).strip("+")


def load_grid(path):
    """Read and check a grid file; every problem is a ValueError naming the file and the entry."""
    path = Path(path)
    try:
        raw = load_config_file(path)
    except Exception as e:  # YAML syntax errors and the like: one clear message
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"grid file not found: {path}") from None
        raise ValueError(f"grid file {path}: {e}") from None
    err = lambda msg: ValueError(f"grid file {path}: {msg}")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise err(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(GRID_KEYS))})")
    for key in ("datasets", "methods", "noise", "seeds"):
        if not raw.get(key):
            raise err(f"'{key}' is missing or empty")

    shared = _flags(raw.get("shared"), "shared", err, also_reserved={"dataset", "method"})
    datasets = _named_flags(raw["datasets"], "datasets", err, also_reserved={"method"})
    methods = _methods(raw, err)
    noise = [_noise_entry(n, i, err) for i, n in enumerate(raw["noise"])]
    seeds = _seeds(raw["seeds"], "seeds", err)
    clean_seeds = _seeds(raw.get("clean_seeds", seeds[:1]), "clean_seeds", err)
    cost = dict(DEFAULT_COST)
    extra_cost = raw.get("cost") or {}
    if not isinstance(extra_cost, dict) or set(extra_cost) - set(DEFAULT_COST):
        raise err(f"'cost' may hold only {', '.join(DEFAULT_COST)}")
    cost.update(extra_cost)

    runs = []
    for ds, ds_flags in datasets.items():
        for ntype, rate in noise:
            for label, (base, m_flags) in methods.items():
                if ntype == "none" and base == ORACLE:
                    continue  # oracle routing needs a known clean mask: it equals lora without noise
                for seed in (clean_seeds if ntype == "none" else seeds):
                    flags = {**({} if {"train_file", "dataset"} & set(ds_flags) else {"dataset": ds}),
                             **shared, **ds_flags, **m_flags, "method": base, "noise_type": ntype,
                             "noise_rate": rate}
                    nl = noise_label(ntype, rate)
                    runs.append(RunSpec(f"{ds}__{nl}__{slug(label)}__seed{seed}", ds, nl, label, base, seed, flags))
    for spec in runs:  # every flag checked now, before hours of training
        try:
            spec.config()
        except ValueError as e:
            raise err(f"run {spec.name}: {e}") from None
        except SystemExit:  # argparse rejected a value (its message is on stderr)
            raise err(f"run {spec.name}: bad flag value in {' '.join(spec.argv('x'))}") from None
    here = lambda key, default: Path(raw.get(key) or default)
    name = str(raw.get("name") or path.stem)
    return Grid(path, name, runs, here("results_dir", "experiments/results"),
                here("report_dir", "experiments/report"), here("work_dir", f"runs/experiments/{name}"), cost)


def _methods(raw, err):
    """{label: (base method, flags)} from 'methods' and 'variants' (labelled base[flag=value,...])."""
    methods = {}
    for label, flags in _named_flags(raw["methods"], "methods", err).items():
        methods[label] = (flags.pop("method", label), flags)
    for i, v in enumerate(raw.get("variants") or []):
        if not isinstance(v, dict) or "base" not in v or set(v) - {"base", "flags", "name"}:
            raise err(f"variants[{i}] must be a mapping with 'base', 'flags' and optionally 'name', got {v!r}")
        if v["base"] not in methods:
            raise err(f"variants[{i}]: base {v['base']!r} is not one of the grid's methods ({', '.join(methods)})")
        base, base_flags = methods[v["base"]]
        extra = _flags(v.get("flags"), f"variants[{i}].flags", err, also_reserved={"method"})
        if not extra:
            raise err(f"variants[{i}] has no flags: it would repeat {v['base']!r}")
        label = v.get("name") or v["base"] + "[" + ",".join(f"{k.replace('_', '-')}={_fmt(x)}"
                                                            for k, x in extra.items()) + "]"
        if label in methods:
            raise err(f"variants[{i}]: the name {label!r} is used twice")
        methods[label] = (base, {**base_flags, **extra})
    slugs = {}
    for label, (base, _) in methods.items():
        if base not in METHODS:
            raise err(f"method {label!r}: {base!r} is not one of {', '.join(METHODS)} "
                      "(set 'method:' inside the entry for a named setting of one of them)")
        if slug(label) in slugs:
            raise err(f"methods {slugs[slug(label)]!r} and {label!r} give the same folder name {slug(label)!r}")
        slugs[slug(label)] = label
    return methods


def _fmt(x):
    return f"{x:g}" if isinstance(x, float) else str(x).lower() if isinstance(x, bool) else str(x)


def _flags(d, where, err, also_reserved=()):
    """Training flags of one grid entry (dashes or underscores), checked by name."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise err(f"{where} must be a mapping of training flags, got {d!r}")
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key in RUNNER_FLAGS:
            raise err(f"{where}: '{k}' is set by the runner for every run and cannot be set in a grid")
        if key in also_reserved:
            raise err(f"{where}: '{k}' cannot be set here (datasets and methods are the grid's own keys)")
        if key not in TrainConfig.__dataclass_fields__:
            raise err(f"{where}: unknown training flag '{k}' (see python -m clear_fast.train --help)")
        out[key] = v
    return out


def _named_flags(d, where, err, also_reserved=()):
    if isinstance(d, list):  # a plain list of names
        d = {name: None for name in d}
    if not isinstance(d, dict):
        raise err(f"'{where}' must be a list of names or a mapping of names to flags")
    return {str(name): _flags(flags, f"{where}.{name}", err, also_reserved) for name, flags in d.items()}


def _noise_entry(n, i, err):
    if n == "none":
        return ("none", 0.0)
    if not isinstance(n, dict) or "type" not in n or set(n) - {"type", "rate"}:
        raise err(f"noise[{i}] must be 'none' or a mapping {{type: ..., rate: ...}}, got {n!r}")
    ntype, rate = n["type"], n.get("rate", 0.0)
    if ntype not in NOISE_TYPES:
        raise err(f"noise[{i}]: type {ntype!r} is not one of {', '.join(NOISE_TYPES)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise err(f"noise[{i}]: rate must be a number in [0, 1), got {rate!r}")
    if ntype != "none" and rate == 0:
        raise err(f"noise[{i}]: {ntype} noise at rate 0 is clean data: write 'none'")
    return (ntype, float(rate) if ntype != "none" else 0.0)


def _seeds(s, where, err):
    if not isinstance(s, list) or not s or not all(isinstance(x, int) and not isinstance(x, bool) for x in s):
        raise err(f"'{where}' must be a non-empty list of integers, got {s!r}")
    if len(set(s)) != len(s):
        raise err(f"'{where}' repeats a seed: {s}")
    return s


# ============================================================================= time estimate
_SIZES = {}


def _split_sizes(cfg):
    """(train, dev, test) sizes after the subsets; None when the data cannot be read here."""
    key = (cfg.dataset, cfg.train_file, cfg.dev_file, cfg.test_file)
    if key not in _SIZES:
        from .data import load_dataset

        try:
            d = load_dataset(None if cfg.train_file else cfg.dataset, train_file=cfg.train_file,
                             test_file=cfg.test_file, dev_file=cfg.dev_file, text_column=cfg.text_column,
                             label_column=cfg.label_column)
            _SIZES[key] = (len(d.train), len(d.dev) if d.dev is not None else 0, len(d.test))
        except Exception:
            _SIZES[key] = None
    sizes = _SIZES[key]
    if sizes is None:
        return None
    train, dev, test = sizes
    if cfg.dev_fraction and not dev:
        dev = round(cfg.dev_fraction * train)
        train -= dev
    cap = lambda n, m: min(n, m) if m else n
    return cap(train, cfg.max_train_samples), cap(dev, cfg.max_eval_samples), cap(test, cfg.max_eval_samples)


def estimate_seconds(spec, cost=DEFAULT_COST):
    """CPU seconds of one run from its settings; every batch is taken as padded to max_length, so the
    no-grad passes (length-sorted batches in the trainer) are over-, not under-estimated."""
    cfg = spec.config()
    sizes = _split_sizes(cfg)
    if sizes is None:
        return None
    n_train, n_dev, n_test = sizes
    per_sample = lambda ab: (ab[0] + ab[1] * cfg.max_length) / 32
    step = per_sample(cost["train_step"]) * (cost["full_factor"] if cfg.method == "full" else 1.0)
    fwd = per_sample(cost["forward"])
    passes = 0 if cfg.clean_prob_source == "train-steps" else (cfg.ensemble_passes if cfg.method in ROUTED else 1)
    epoch = n_train * step + (n_dev + n_test + passes * n_train) * fwd
    embed = n_train * fwd if cfg.noise_type == "instance" else 0.0  # sentence embeddings for the noise
    return cost["startup_s"] + embed + cfg.num_epochs * epoch


def _hms(seconds):
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ============================================================================= running
def run_status(spec, grid):
    """done (results copied) | copy (finished, not copied) | resume (checkpoint) | restart | new."""
    if all((grid.results_dir / spec.name / f).is_file() for f in RESULT_FILES):
        return "done"
    out = grid.work_dir / spec.name
    if (out / "results.json").is_file():
        return "copy"
    if (out / "checkpoint.pt").is_file():
        return "resume"
    return "restart" if out.exists() and any(out.iterdir()) else "new"


def stale_flags(spec, grid):
    """Flags of a finished run that differ from the grid's now (empty when it matches)."""
    meta = grid.results_dir / spec.name / "run.json"
    if not meta.is_file():
        return {}
    saved = json.loads(meta.read_text()).get("flags", {})
    now = json.loads(json.dumps(spec.flags))  # as it would be saved: tuples become lists
    return {k: (saved.get(k), now.get(k)) for k in {**saved, **now} if saved.get(k) != now.get(k)}


def select(runs, methods=None, datasets=None, noise=None, seeds=None, only=None):
    """Filter runs; noise matches a label (symmetric0.4) or a type (symmetric: every rate)."""
    def keep(r):
        return ((not methods or r.method in methods) and (not datasets or r.dataset in datasets)
                and (not noise or r.noise in noise or r.flags["noise_type"] in noise)
                and (seeds is None or r.seed in seeds)
                and (not only or any(fnmatch.fnmatchcase(r.name, g) for g in only)))
    return [r for r in runs if keep(r)]


def launch(argv, log_path, echo=True, threads=None):
    """Run the training CLI in a subprocess, logging (and with echo, printing) its output; returns its
    exit status. threads: OMP_NUM_THREADS for the child unless the user set it. On Ctrl-C the child
    (same process group) checkpoints and exits; a SIGINT sent to this process alone is passed on."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "clear_fast.train", *argv]
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env)
        try:
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                log.write(line)
            return proc.wait()
        except KeyboardInterrupt:
            try:  # a terminal's Ctrl-C reached the child too: let it checkpoint and exit
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # the SIGINT was sent to this process only
                proc.send_signal(signal.SIGINT)
                proc.wait()
            raise


def collect(spec, grid, wall_s=None, estimated_s=None):
    """Copy a finished run's small files to <results_dir>/<name>/, plus run.json (how it was made)."""
    src, dst = grid.work_dir / spec.name, grid.results_dir / spec.name
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "metrics.jsonl", dst / "metrics.jsonl")
    results = json.loads((src / "results.json").read_text())
    results["noise"] = _slim_noise(results["noise"])
    write_json(dst / "results.json", results)
    write_json(dst / "noise.json", _slim_noise(json.loads((src / "noise.json").read_text())))
    write_json(dst / "run.json", {"name": spec.name, "dataset": spec.dataset, "noise": spec.noise,
                                  "method": spec.method, "base_method": spec.base_method, "seed": spec.seed,
                                  "flags": spec.flags, "grid": str(grid.path), "runner_wall_s": wall_s,
                                  "estimated_s": None if estimated_s is None else round(estimated_s, 1),
                                  "command": "python -m clear_fast.train " + " ".join(
                                      spec.argv(grid.work_dir / spec.name))})
    return dst


def _slim_noise(noise):
    """The noise summary without its large parts, the per-sample clean mask and the K x K transition
    matrix (the seeds reproduce both): only the flips that happened, as {"true->observed": count}."""
    noise = dict(noise)
    noise.pop("clean_mask", None)
    counts = np.asarray(noise.pop("transition_counts"))
    noise["flips"] = {f"{i}->{j}": int(counts[i, j]) for i, j in zip(*np.nonzero(counts)) if i != j}
    return noise


_GIT_LOCK = threading.Lock()  # parallel runs of one runner commit one at a time


def git_commit(path, message, attempts=30):
    """git add + commit of one folder only (other people's staged files stay out of the commit)."""
    path = Path(path).resolve()
    top = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode:
        raise RuntimeError(f"--commit: {path} is not inside a git repository")
    top, rel = top.stdout.strip(), os.path.relpath(path, top.stdout.strip())

    def git(*args, ok=(0,)):
        for _ in range(attempts):
            p = subprocess.run(["git", *args], cwd=top, capture_output=True, text=True)
            if "index.lock" not in p.stderr:
                break
            time.sleep(2)  # someone else's git command holds the index
        if p.returncode not in ok:
            raise RuntimeError(f"git {' '.join(args)} failed: {p.stderr.strip() or p.stdout.strip()}")
        return p.returncode

    git("add", rel)
    if git("diff", "--cached", "--quiet", "--", rel, ok=(0, 1)):  # 1: there is something to commit
        git("commit", "-q", "-m", message, "--", rel)


def run_grid(grid, runs, dry_run=False, max_runs=None, commit=False, progress=False, jobs=1):
    """Run (or list) the given runs in order, jobs of them at a time; returns the process exit status."""
    todo = [(r, run_status(r, grid)) for r in runs]
    est = {r.name: estimate_seconds(r, grid.cost) for r, s in todo if s != "done"}
    print(f"grid {grid.name} ({grid.path}): {len(runs)} runs selected, "
          f"{sum(s == 'done' for _, s in todo)} done; results in {grid.results_dir}, work dir {grid.work_dir}")
    for r, s in todo:
        stale = stale_flags(r, grid) if s == "done" else {}
        if stale:
            what = ", ".join(f"{k} {a!r} (grid now {b!r})" for k, (a, b) in stale.items())
            print(f"  warning: {r.name} was made with other settings: {what}; its results are kept: "
                  f"delete {grid.results_dir / r.name} to run it again")
    train = [(r, s) for r, s in todo if s != "done"]
    if max_runs is not None:
        needs = [x for x in train if x[1] != "copy"][:max_runs]
        train = [x for x in train if x[1] == "copy" or x in needs]
    total = sum(est.get(r.name) or 0 for r, s in train if s != "copy")
    if dry_run:
        for r, s in todo:
            print(f"  {s:8s} {_hms(est.get(r.name)) if s not in ('done', 'copy') else '-':>8s}  {r.name}")
        print(f"would run {sum(s != 'copy' for _, s in train)} runs, estimated {_hms(total)} "
              f"on a 2-core CPU ({total / 3600:.1f} h)")
        return 0

    # With jobs > 1 each run gets an equal share of the cores (OMP_NUM_THREADS) and only its start and
    # end are printed; small models train faster as parallel 1-thread runs than one run on all cores.
    threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    stop = threading.Event()

    def one(k, r, s):
        """Train (or only copy) run r; returns its name if it failed."""
        if stop.is_set():
            return r.name
        out = grid.work_dir / r.name
        wall = None
        if s != "copy":
            left = sum(est.get(x.name) or 0 for x, xs in train[k - 1:] if xs != "copy")
            print(f"\n[{k}/{len(train)}] {r.name} ({s}, estimated {_hms(est.get(r.name))}; "
                  f"{_hms(left)} left with this one)", flush=True)
            extra = {"resume": ["--resume"], "restart": ["--overwrite"]}.get(s, [])
            t0 = time.time()
            rc = launch(r.argv(out, progress) + extra, grid.work_dir / f"{r.name}.log", echo=jobs == 1,
                        threads=threads)
            if rc == 130:  # the training was interrupted (Ctrl-C reaches every run): start no other
                stop.set()
            if rc != 0 or not (out / "results.json").is_file():
                print(f"  failed (exit status {rc}); log: {grid.work_dir / (r.name + '.log')}", file=sys.stderr)
                return r.name
            wall = round(time.time() - t0, 1)
        dst = collect(r, grid, wall, est.get(r.name))
        if commit:
            with _GIT_LOCK:
                git_commit(dst, f"results: {r.name}")
        print(f"  {r.name}: results in {dst}" + (" (committed)" if commit else ""), flush=True)
        return None

    try:
        if jobs == 1:
            failed = [one(k, r, s) for k, (r, s) in enumerate(train, 1)]
        else:
            with ThreadPoolExecutor(jobs) as pool:
                futures = [pool.submit(one, k, r, s) for k, (r, s) in enumerate(train, 1)]
                try:
                    failed = [f.result() for f in futures]
                except KeyboardInterrupt:
                    stop.set()  # before the pool waits for its threads: no new run starts
                    raise
    except KeyboardInterrupt:  # the running trainings got the SIGINT too: they checkpoint and exit
        print("\ninterrupted: run the same command again to resume the unfinished runs", file=sys.stderr)
        return 130
    failed = [n for n in failed if n]
    if failed:
        print(f"\n{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ============================================================================= report
ACC_METRICS = ("best", "last", "dev_selected")
DETECTION = ("auroc", "recall", "classes_none_found")  # final clean detection, from results.json
METRICS = ACC_METRICS + ("dev_best",) + DETECTION
METHOD_ORDER = {m: i for i, m in enumerate(("lora", "clear-lora", "oracle-lora", "full"))}
NOISE_ORDER = {t: i for i, t in enumerate(NOISE_TYPES)}


# Configuration keys that may differ between the seeds of one table cell.
PER_RUN_SETTINGS = {"seed", "noise_seed", "output_dir", "overwrite", "resume", "progress", "plots", "save_adapter",
                    "keep_model"}


def load_results(results_dir):
    """One row per finished run under results_dir: its grouping keys, metrics and AUROC per epoch."""
    rows = []
    for res_path in sorted(Path(results_dir).glob("*/results.json")):
        res = json.loads(res_path.read_text())
        meta_path = res_path.parent / "run.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        noise = res.get("noise", {})
        ntype, rate = noise.get("noise_type", "none"), noise.get("requested_rate", 0.0)
        det = res.get("final_clean_detection") or {}
        mpath = res_path.parent / "metrics.jsonl"
        records = read_jsonl(mpath) if mpath.is_file() else []
        dev = [r["dev_accuracy"] for r in records if r.get("dev_accuracy") is not None]
        rows.append({
            "run": res_path.parent.name, "dataset": meta.get("dataset", res["dataset"]),
            "noise": noise_label(ntype, rate), "noise_type": ntype, "noise_rate": 0.0 if ntype == "none" else rate,
            "method": meta.get("method", res["method"]), "seed": meta.get("seed", res["config"]["seed"]),
            "best": res["best_test_accuracy"], "last": res["last_test_accuracy"],
            "dev_selected": res.get("dev_selected_test_accuracy"), "dev_best": max(dev) if dev else None,
            "dev_epoch": res.get("dev_selected_epoch"),
            **{m: det.get(m) for m in DETECTION},
            "flip_rate": noise.get("achieved_flip_rate"), "wall_s": res.get("wall_time_s"),
            "auroc_by_epoch": [r.get("clean_auroc") for r in records],
            "settings": json.dumps({k: v for k, v in TrainConfig.saved_with_defaults(res.get("config", {})).items()
                                    if k not in PER_RUN_SETTINGS}, sort_keys=True),
        })
    return rows


def _mean_std(values):
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _method_key(m):
    base = m.split("[")[0]
    return (METHOD_ORDER.get(base, len(METHOD_ORDER)), m != base, m)


def _noise_key(r):
    return r["dataset"], NOISE_ORDER.get(r["noise_type"], len(NOISE_ORDER)), r["noise_rate"]


def aggregate(rows):
    """Mean, sample std (ddof 1) and count over seeds per dataset x noise x method."""
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["noise"], r["method"]), []).append(r)
    table = []
    for (ds, nl, method), rs in groups.items():
        entry = {"dataset": ds, "noise": nl, "noise_type": rs[0]["noise_type"], "noise_rate": rs[0]["noise_rate"],
                 "method": method, "n": len(rs), "seeds": " ".join(str(s) for s in sorted(r["seed"] for r in rs)),
                 "mixed_settings": len({r["settings"] for r in rs}) > 1}
        for m in METRICS + ("dev_epoch", "flip_rate", "wall_s"):
            entry[f"{m}_mean"], entry[f"{m}_std"], entry[f"{m}_n"] = _mean_std([r[m] for r in rs])
        table.append(entry)
    table.sort(key=lambda e: (*_noise_key(e), _method_key(e["method"])))
    return table


def pooled_std(s1, n1, s2, n2):
    """Pooled sample standard deviation of two groups; nan when either has a single run."""
    if n1 < 2 or n2 < 2:
        return math.nan
    return math.sqrt(((n1 - 1) * s1 ** 2 + (n2 - 1) * s2 ** 2) / (n1 + n2 - 2))


def compare_to(table, reference="lora"):
    """Each other method minus `reference` per dataset x noise: the difference of means and whether it
    is within one pooled standard deviation (a 'gain' that small is seed-to-seed noise)."""
    ref = {(e["dataset"], e["noise"]): e for e in table if e["method"] == reference}
    out = []
    for e in table:
        r = ref.get((e["dataset"], e["noise"]))
        if e["method"] == reference or r is None:
            continue
        row = {"dataset": e["dataset"], "noise": e["noise"], "method": e["method"], "reference": reference}
        for m in ACC_METRICS:
            diff = e[f"{m}_mean"] - r[f"{m}_mean"]
            sd = pooled_std(e[f"{m}_std"], e[f"{m}_n"], r[f"{m}_std"], r[f"{m}_n"])
            row[f"{m}_diff"], row[f"{m}_pooled_std"] = diff, sd
            row[f"{m}_verdict"] = ("no data" if math.isnan(diff) else "single seed: spread unknown" if math.isnan(sd)
                                   else "within seed spread" if abs(diff) <= sd else "beyond seed spread")
        out.append(row)
    return out


def _cell(e, metric, scale=100.0, digits=1):
    """mean ± std of one table entry; (n=k) when fewer runs than the group have this figure."""
    mean, std, n = e[f"{metric}_mean"], e[f"{metric}_std"], e[f"{metric}_n"]
    if math.isnan(mean):
        return "–"
    text = f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if not math.isnan(std) else "")
    return text + (f" (n={n})" if n != e["n"] else "")


def summary_table(table, metric, title):
    """One metric as dataset x noise rows and one column per method (cells: mean ± std, n=k seeds)."""
    methods = sorted(dict.fromkeys(e["method"] for e in table), key=_method_key)
    cells = {(e["dataset"], e["noise"], e["method"]): e for e in table}
    lines = [f"### {title}", "", "| dataset | noise | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for ds, noise in dict.fromkeys((e["dataset"], e["noise"]) for e in table):
        row = [(_cell(cells[ds, noise, m], metric) + f" (n={cells[ds, noise, m]['n']})")
               if (ds, noise, m) in cells else "" for m in methods]
        lines.append(f"| {ds} | {noise} | " + " | ".join(row) + " |")
    return lines + [""]


def markdown_report(table, comparison, n_runs, results_dir):
    lines = [f"Aggregated from {n_runs} finished run(s) in `{results_dir}` by "
             "`python -m clear_fast.experiments report`. Test accuracy in %, mean ± sample standard deviation "
             "over seeds (n = number of seeds); best = best epoch, last = last epoch, dev-selected = the epoch "
             "with the best dev accuracy; best dev = that dev accuracy (for tuning); AUROC = clean-detection "
             "AUROC of the last epoch's clean probability against the true clean mask (– where undefined, "
             "e.g. clean data); clean recall = fraction of the clean samples with p > 0.5 at the end; classes "
             "none found = fraction of classes none of whose clean samples has p > 0.5 (those classes no "
             "longer train the adapters; – for runs made before this figure existed). A method marked "
             "*(mixed settings)* averages runs whose configurations differ in more than the seed.", ""]
    lines += summary_table(table, "dev_selected", "Summary: dev-selected test accuracy") + \
        summary_table(table, "last", "Summary: last-epoch test accuracy")
    for ds in dict.fromkeys(e["dataset"] for e in table):
        lines += [f"### {ds}", "", "| noise | method | n | best | last | dev-selected | best dev | AUROC | clean recall "
                  "| classes none found |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in (e for e in table if e["dataset"] == ds):
            cells = [_cell(e, m) for m in ACC_METRICS + ("dev_best",)] + [_cell(e, m, 1.0, 2) for m in DETECTION]
            method = e["method"] + (" **(mixed settings)**" if e["mixed_settings"] else "")
            lines.append(f"| {e['noise']} | {method} | {e['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    if comparison:
        lines += ["### Each method minus lora (percentage points)", "",
                  "A difference no larger than the pooled seed standard deviation is marked *within seed spread*: "
                  "it is not a gain.", "", "| dataset | noise | method | best | last | dev-selected |",
                  "|---|---|---|---|---|---|"]
        for c in comparison:
            cell = lambda m: ("–" if math.isnan(c[f"{m}_diff"]) else f"{100 * c[f'{m}_diff']:+.1f}"
                              + ("" if c[f"{m}_verdict"] == "beyond seed spread" else f" ({c[f'{m}_verdict']})"))
            lines.append(f"| {c['dataset']} | {c['noise']} | {c['method']} | {cell('best')} | {cell('last')} "
                         f"| {cell('dev_selected')} |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path, rows):
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else "" if isinstance(v, float)
                        else v) for k, v in r.items()})
    write_text(path, buf.getvalue())


def plot_accuracy_by_noise(table, path):
    """Dev-selected and last test accuracy per noise setting, one column of panels per dataset."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(e["dataset"] for e in table))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7.5), squeeze=False,
                             layout="constrained")
    for j, ds in enumerate(datasets):
        rows = [e for e in table if e["dataset"] == ds]
        noises = list(dict.fromkeys(e["noise"] for e in rows))
        methods = sorted(dict.fromkeys(e["method"] for e in rows), key=_method_key)
        width = 0.8 / max(len(methods), 1)  # grouped bars: the noise settings are categories
        for i, metric in enumerate(("dev_selected", "last")):
            ax = axes[i][j]
            lows = []
            for k, m in enumerate(methods):
                cells = {e["noise"]: e for e in rows if e["method"] == m}
                xs = [x + width * (k - (len(methods) - 1) / 2) for x, n in enumerate(noises) if n in cells]
                ys = [100 * cells[n][f"{metric}_mean"] for n in noises if n in cells]
                es = [0 if math.isnan(cells[n][f"{metric}_std"]) else 100 * cells[n][f"{metric}_std"]
                      for n in noises if n in cells]
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=m)
                lows += [y - e for y, e in zip(ys, es)]
            if lows:  # start near the lowest bar: the differences, not the common height, matter
                ax.set_ylim(bottom=max(0.0, min(lows) - 5))
            ax.set_xticks(range(len(noises)), noises, rotation=20)
            ax.set_xlim(-0.5, len(noises) - 0.5)
            ax.set_ylabel(f"{metric.replace('_', '-')} test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0][j].set_title(ds)
        axes[0][j].legend(fontsize=8)
    fig.suptitle("Test accuracy by label noise (mean ± std over seeds)")
    save_figure(fig, path)
    plt.close(fig)


def plot_auroc_over_epochs(rows, path):
    """Clean-detection AUROC per epoch, mean over seeds, one panel per dataset x noisy setting."""
    plt = _pyplot()
    noisy = sorted((r for r in rows if r["noise_type"] != "none"), key=_noise_key)
    panels = list(dict.fromkeys((r["dataset"], r["noise"]) for r in noisy))
    if not panels:
        return False
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, layout="constrained")
    for ax, (ds, nl) in zip(axes.flat, panels):
        rs = [r for r in rows if (r["dataset"], r["noise"]) == (ds, nl)]
        for m in sorted(dict.fromkeys(r["method"] for r in rs), key=_method_key):
            curves = [[np.nan if a is None else a for a in r["auroc_by_epoch"]] for r in rs if r["method"] == m]
            width = max(map(len, curves))
            pad = np.full((len(curves), width), np.nan)
            for i, c in enumerate(curves):
                pad[i, : len(c)] = c
            ax.plot(range(1, width + 1), np.nanmean(pad, axis=0), marker="o", ms=3, label=m)
        ax.set_title(f"{ds}, {nl}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("clean-detection AUROC")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Clean-detection AUROC over epochs (mean over seeds)")
    save_figure(fig, path)
    plt.close(fig)
    return True


def report(results_dir, out_dir):
    """Write results.csv, comparison.csv, results.md and the two plots; returns (table, comparison)."""
    import warnings

    rows = load_results(results_dir)
    if not rows:
        raise ValueError(f"no finished runs (*/results.json) under {results_dir}")
    table, out_dir = aggregate(rows), Path(out_dir)
    comparison = compare_to(table)
    for e in (e for e in table if e["mixed_settings"]):
        print(f"warning: {e['dataset']} / {e['noise']} / {e['method']} mixes runs made with different settings "
              f"(compare their results.json 'config')", file=sys.stderr)
    write_csv(out_dir / "results.csv", table)
    write_csv(out_dir / "comparison.csv", comparison)
    write_text(out_dir / "results.md", markdown_report(table, comparison, len(rows), results_dir) + "\n")
    with warnings.catch_warnings():  # nanmean of an epoch no run reached
        warnings.simplefilter("ignore", RuntimeWarning)
        plot_accuracy_by_noise(table, out_dir / "accuracy_by_noise.png")
        plot_auroc_over_epochs(rows, out_dir / "auroc_over_epochs.png")
    return table, comparison


# ============================================================================= CLI
def build_parser():
    p = argparse.ArgumentParser(prog="python -m clear_fast.experiments",
                                description="Run an experiment grid of clear_fast.train runs (resumable, "
                                            "skips finished runs), or aggregate results with 'report'.")
    p.add_argument("--grid", default="experiments/grid.yaml", help="grid file (YAML or JSON)")
    p.add_argument("--results-dir", help="where finished runs' small files go (default: the grid's results_dir)")
    p.add_argument("--work-dir", help="where runs write their full outputs (default: the grid's work_dir)")
    p.add_argument("--methods", nargs="+", help="only these method labels (e.g. lora clear-lora[gamma=0.7])")
    p.add_argument("--datasets", nargs="+", help="only these datasets")
    p.add_argument("--noise", nargs="+", help="only these noise settings (none, symmetric0.4) or types (symmetric)")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    p.add_argument("--only", nargs="+", metavar="GLOB", help="only run names matching one of these globs")
    p.add_argument("--dry-run", action="store_true", help="list the runs with their status and estimated time")
    p.add_argument("--max-runs", type=int, help="train at most N runs, then stop")
    p.add_argument("--jobs", type=int, default=1,
                   help="train N runs at once, each on cores/N threads (default 1: one run on all cores)")
    p.add_argument("--commit", action="store_true", help="git-commit each finished run's result folder")
    p.add_argument("--progress", action="store_true", help="progress bars inside each run")
    return p


def build_report_parser():
    p = argparse.ArgumentParser(prog="python -m clear_fast.experiments report",
                                description="Aggregate finished runs into a table (CSV, Markdown) and plots.")
    p.add_argument("--grid", default="experiments/grid.yaml", help="take results_dir and report_dir from this grid")
    p.add_argument("--results-dir", help="folder of run results (overrides the grid's)")
    p.add_argument("--out", help="output folder (overrides the grid's report_dir)")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    is_report = bool(argv) and argv[0] == "report"
    if argv and argv[0] in ("run", "report"):
        argv = argv[1:]
    args = (build_report_parser() if is_report else build_parser()).parse_args(argv)
    try:
        if is_report:
            results_dir, out = args.results_dir, args.out
            if results_dir is None or out is None:
                grid = load_grid(args.grid)
                results_dir, out = results_dir or grid.results_dir, out or grid.report_dir
            table, _ = report(results_dir, out)
            print(f"{len(table)} table rows from {results_dir}; wrote results.md, results.csv, comparison.csv, "
                  f"accuracy_by_noise.png, auroc_over_epochs.png to {out}")
            return 0
        for flag in ("max_runs", "jobs"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
        grid = load_grid(args.grid)
        if args.results_dir:
            grid.results_dir = Path(args.results_dir)
        if args.work_dir:
            grid.work_dir = Path(args.work_dir)
        runs = select(grid.runs, args.methods, args.datasets, args.noise, args.seeds, args.only)
        if not runs:
            raise ValueError("the filters match no run of the grid (see --dry-run without filters for the names)")
        return run_grid(grid, runs, args.dry_run, args.max_runs, args.commit, args.progress, args.jobs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(main())
