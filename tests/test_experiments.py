"""The experiment runner: a tiny real grid end to end, skipping and resuming, filters, the report's
arithmetic against hand computations, and clear errors for bad grid files."""
import json
import math
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from clear_fast import experiments as ex

WORDS = {0: "alpha apple amber", 1: "bravo banana blue", 2: "charlie cherry cyan", 3: "delta date dune"}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer random BERT saved with the MiniLM tokenizer (as in test_train.py)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from clear_fast.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=40)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("toy")
    for split, n in (("train", 64), ("dev", 16), ("test", 24)):
        rows = ["text,label"] + [" ".join(rng.choice(WORDS[i % 4].split() + ["the", "word"], size=5))
                                 + f",c{i % 4}" for i in range(n)]
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return d


def write_grid(path, model, files, **over):
    grid = {
        "name": "tiny",
        "shared": {"model": model, "max_length": 12, "batch_size": 16, "num_epochs": 2, "warmup_epochs": 1,
                   "learning_rate": 3e-3, "max_train_samples": 0, "plots": False, "save_adapter": False},
        "datasets": {"toy": {"train_file": str(files / "train.csv"), "dev_file": str(files / "dev.csv"),
                             "test_file": str(files / "test.csv")}},
        "methods": {"lora": {}, "clear-lora": {}},
        "noise": [{"type": "symmetric", "rate": 0.3}],
        "seeds": [0, 1],
    }
    grid.update(over)
    path.write_text(yaml.safe_dump(grid))
    return path


def dirs(tmp_path):
    return ["--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work")]


@pytest.fixture
def in_process(monkeypatch):
    """Train in this process instead of a subprocess (a fresh interpreter per run costs seconds of
    imports); the subprocess launcher itself is tested on its own below."""
    from clear_fast.train import main as train_main

    calls = []
    monkeypatch.setattr(ex, "launch", lambda argv, log, **kw: calls.append(argv) or train_main(argv))
    return calls


def test_launch_runs_the_training_cli_in_a_subprocess_and_logs_it(tmp_path, capsys):
    log = tmp_path / "logs" / "run.log"
    assert ex.launch(["--help"], log) == 0
    text = log.read_text()
    assert text.startswith("$ ") and "-m clear_fast.train --help" in text
    assert "usage: python -m clear_fast.train" in text and "usage: python -m clear_fast.train" in capsys.readouterr().out
    assert ex.launch(["--method", "magic", "--no-progress"], log) == 2
    assert "--method 'magic' is not one of" in log.read_text()


def test_tiny_grid_runs_skips_and_reports(tiny_bert, toy_files, tmp_path, in_process):
    grid = write_grid(tmp_path / "grid.yaml", tiny_bert, toy_files)
    assert ex.main(["--grid", str(grid), *dirs(tmp_path)]) == 0
    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert names == sorted(f"toy__symmetric0.3__{m}__seed{s}" for m in ("lora", "clear-lora") for s in (0, 1))
    for n in names:
        res = tmp_path / "results" / n
        assert sorted(p.name for p in res.iterdir()) == ["metrics.jsonl", "noise.json", "results.json", "run.json"]
        noise = json.loads((res / "noise.json").read_text())
        assert "clean_mask" not in noise and sum(noise["flips"].values()) == noise["num_flipped"]
        assert json.loads((res / "results.json").read_text())["noise"] == noise  # slimmed the same way
        meta = json.loads((res / "run.json").read_text())
        work = json.loads((tmp_path / "work" / n / "results.json").read_text())
        assert work["config"]["seed"] == meta["seed"] and work["method"] == meta["method"]
        assert work["config"]["noise_rate"] == 0.3 and len(work["epoch_time_s"]) == 2

    assert len(in_process) == 4 and all("--no-progress" in argv for argv in in_process)
    # a second pass trains nothing: no launch, no results.json in the work dir rewritten
    stamps = {n: (tmp_path / "work" / n / "results.json").stat().st_mtime_ns for n in names}
    assert ex.main(["--grid", str(grid), *dirs(tmp_path)]) == 0
    assert len(in_process) == 4
    assert stamps == {n: (tmp_path / "work" / n / "results.json").stat().st_mtime_ns for n in names}

    table, comparison = ex.report(tmp_path / "results", tmp_path / "report")
    assert [(e["method"], e["n"]) for e in table] == [("lora", 2), ("clear-lora", 2)]
    lora_best = [json.loads((tmp_path / "results" / f"toy__symmetric0.3__lora__seed{s}" / "results.json")
                            .read_text())["best_test_accuracy"] for s in (0, 1)]
    assert math.isclose(table[0]["best_mean"], np.mean(lora_best))
    for f in ("results.md", "results.csv", "comparison.csv", "accuracy_by_noise.png", "auroc_over_epochs.png"):
        assert (tmp_path / "report" / f).stat().st_size > 0
    assert comparison[0]["method"] == "clear-lora"


def test_interrupted_run_resumes_and_a_finished_one_is_only_copied(tiny_bert, toy_files, tmp_path, monkeypatch,
                                                                    capsys):
    grid = ex.load_grid(write_grid(tmp_path / "grid.yaml", tiny_bert, toy_files, seeds=[0],
                                   methods={"lora": {}}))
    grid.results_dir, grid.work_dir = tmp_path / "results", tmp_path / "work"
    spec = grid.runs[0]
    assert ex.run_status(spec, grid) == "new"
    (grid.work_dir / spec.name).mkdir(parents=True)
    (grid.work_dir / spec.name / "checkpoint.pt").write_bytes(b"")
    assert ex.run_status(spec, grid) == "resume"
    calls = []
    monkeypatch.setattr(ex, "launch", lambda argv, log, **kw: calls.append(argv) or 1)
    assert ex.run_grid(grid, grid.runs) == 1  # the (fake) training failed: reported, not copied
    assert calls[0][-1] == "--resume" and "--output-dir" in calls[0]
    assert not (grid.results_dir / spec.name).exists()

    # finished in the work dir but never copied (e.g. the runner was killed in between): copy, no training
    from clear_fast.train import main as train_main

    (grid.work_dir / spec.name / "checkpoint.pt").unlink()
    assert train_main(spec.argv(grid.work_dir / spec.name) + ["--overwrite"]) == 0
    assert ex.run_status(spec, grid) == "copy"
    calls.clear()
    assert ex.run_grid(grid, grid.runs) == 0 and calls == []
    assert ex.run_status(spec, grid) == "done"

    # the grid changed after the run finished: the committed result is kept, and the user is told
    spec.flags["learning_rate"] = 1e-2
    assert ex.stale_flags(spec, grid) == {"learning_rate": (3e-3, 1e-2)}
    assert ex.run_grid(grid, grid.runs) == 0 and calls == []
    assert "made with other settings: learning_rate 0.003 (grid now 0.01)" in capsys.readouterr().out


def test_jobs_run_at_once_on_a_share_of_the_cores_and_failures_are_all_reported(tiny_bert, toy_files, tmp_path,
                                                                                 monkeypatch, capsys):
    grid = ex.load_grid(write_grid(tmp_path / "grid.yaml", tiny_bert, toy_files))
    grid.results_dir, grid.work_dir = tmp_path / "results", tmp_path / "work"
    running, seen, lock = [0], [], threading.Lock()

    def fake_launch(argv, log, echo=True, threads=None):
        with lock:
            running[0] += 1
            seen.append((running[0], echo, threads))
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return 1

    monkeypatch.setattr(ex, "launch", fake_launch)
    monkeypatch.setattr(ex.os, "cpu_count", lambda: 4)
    assert ex.run_grid(grid, grid.runs, jobs=2) == 1
    assert len(seen) == 4 and max(n for n, _, _ in seen) == 2  # two at a time, never more
    assert all(echo is False and threads == 2 for _, echo, threads in seen)
    err = capsys.readouterr().err
    assert "4 run(s) failed" in err and all(r.name in err for r in grid.runs)
    assert ex.main(["--grid", str(tmp_path / "grid.yaml"), "--jobs", "0"]) == 2


def test_ctrl_c_with_jobs_starts_no_new_run(tiny_bert, toy_files, tmp_path, monkeypatch, capsys):
    grid = ex.load_grid(write_grid(tmp_path / "grid.yaml", tiny_bert, toy_files))
    grid.results_dir, grid.work_dir = tmp_path / "results", tmp_path / "work"
    started = []

    def fake_launch(argv, log, echo=True, threads=None):
        started.append(argv)
        time.sleep(0.3)  # the runner now waits for results
        if argv is started[0]:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C reaches the runner...
        time.sleep(0.3)
        return 130  # ...and every training, which checkpoints and exits with 130

    monkeypatch.setattr(ex, "launch", fake_launch)
    # A shell that starts the tests in the background (`cmd &`) leaves SIGINT ignored, and Python then
    # keeps it ignored: give it Python's usual Ctrl-C handler for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert ex.run_grid(grid, grid.runs, jobs=2) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(grid.runs) == 4 and len(started) == 2  # the two running ones, and no third
    assert "interrupted" in capsys.readouterr().err


def test_commit_puts_only_the_run_folder_in_a_commit(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    run = repo / "experiments" / "results" / "a__none__lora__seed0"
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (repo / "other.txt").write_text("someone else's work")
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    git("add", "other.txt")  # staged by someone else: must stay out of the commit
    ex.git_commit(run, "results: a__none__lora__seed0")
    assert git("log", "--format=%s").strip() == "results: a__none__lora__seed0"
    assert git("show", "--name-only", "--format=").split() == ["experiments/results/a__none__lora__seed0/results.json"]
    assert "other.txt" in git("diff", "--cached", "--name-only")
    ex.git_commit(run, "results: again")  # nothing changed (e.g. a re-copy): no error, no empty commit
    assert len(git("log", "--format=%s").splitlines()) == 1


def fake_run(root, dataset, noise, rate, method, seed, best, last, dev_sel, auroc, aurocs=(), lr=2e-3, **detection):
    d = root / f"{dataset}__{ex.noise_label(noise, rate)}__{ex.slug(method)}__seed{seed}"
    d.mkdir(parents=True)
    res = {"dataset": dataset, "method": method.split("[")[0], "noise": {"noise_type": noise, "requested_rate": rate},
           "best_test_accuracy": best, "last_test_accuracy": last, "dev_selected_test_accuracy": dev_sel,
           "final_clean_detection": {"auroc": auroc, **detection}, "config": {"seed": seed, "learning_rate": lr}}
    (d / "results.json").write_text(json.dumps(res))
    (d / "run.json").write_text(json.dumps({"method": method, "dataset": dataset, "seed": seed}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"clean_auroc": a, "dev_accuracy": 0.5 + seed / 10}) + "\n"
                                             for a in aurocs))


def test_report_mean_std_and_seed_spread_by_hand(tmp_path):
    r = tmp_path / "results"
    for s, (b, l, d, a) in enumerate([(0.70, 0.60, 0.65, 0.90), (0.74, 0.62, 0.69, 0.80), (0.78, 0.70, 0.73, 0.85)]):
        fake_run(r, "bank", "symmetric", 0.4, "clear-lora", s, b, l, d, a, aurocs=(0.9, 0.8),
                 **({} if s == 0 else {"recall": 0.5 + s / 10, "classes_none_found": 0.1}))
    for s, (b, l, d) in enumerate([(0.72, 0.50, 0.66), (0.73, 0.51, 0.67), (0.74, 0.52, 0.68)]):
        fake_run(r, "bank", "symmetric", 0.4, "lora", s, b, l, d, 0.7, aurocs=(0.7,))
    fake_run(r, "bank", "symmetric", 0.4, "clear-lora[gamma=0.7]", 0, 0.9, 0.9, 0.9, 0.95)
    fake_run(r, "bank", "none", 0.0, "lora", 0, 0.9, 0.88, 0.89, None)
    fake_run(r, "bank", "none", 0.0, "full", 0, 0.9, 0.88, 0.89, None)
    fake_run(r, "bank", "none", 0.0, "full", 1, 0.9, 0.88, 0.89, None, lr=1e-3)
    table, comp = ex.report(r, tmp_path / "out")
    t = {(e["noise"], e["method"]): e for e in table}
    c = t[("symmetric0.4", "clear-lora")]
    assert c["n"] == 3 and c["seeds"] == "0 1 2"
    assert math.isclose(c["best_mean"], 0.74) and math.isclose(c["best_std"], 0.04)  # sample std, ddof 1
    assert math.isclose(c["last_mean"], 0.64) and math.isclose(c["last_std"], math.sqrt(0.0028))
    assert math.isclose(c["auroc_mean"], 0.85) and math.isclose(c["auroc_std"], 0.05)
    assert math.isclose(c["dev_best_mean"], 0.6)  # max dev accuracy per run: 0.5, 0.6, 0.7
    assert math.isclose(t[("symmetric0.4", "lora")]["best_std"], 0.01)
    assert t[("none", "lora")]["n"] == 1 and math.isnan(t[("none", "lora")]["best_std"])
    assert math.isnan(t[("none", "lora")]["auroc_mean"])
    # order: noise none first, then lora, clear-lora, its variant
    assert [k for k in t] == [("none", "lora"), ("none", "full"), ("symmetric0.4", "lora"),
                              ("symmetric0.4", "clear-lora"), ("symmetric0.4", "clear-lora[gamma=0.7]")]
    assert t[("none", "full")]["mixed_settings"] and not c["mixed_settings"]
    assert "| none | full **(mixed settings)** | 2 |" in (tmp_path / "out" / "results.md").read_text()
    cmp = {x["method"]: x for x in comp}
    # best: +0.01 vs pooled sqrt((0.04^2 + 0.01^2) / 2) = 0.0292 -> within; last: +0.13 vs 0.0381 -> beyond
    assert math.isclose(cmp["clear-lora"]["best_diff"], 0.01) and cmp["clear-lora"]["best_verdict"] == "within seed spread"
    assert math.isclose(cmp["clear-lora"]["best_pooled_std"], math.sqrt((0.04 ** 2 + 0.01 ** 2) / 2))
    assert cmp["clear-lora"]["last_verdict"] == "beyond seed spread"
    assert cmp["clear-lora[gamma=0.7]"]["best_verdict"] == "single seed: spread unknown"
    md = (tmp_path / "out" / "results.md").read_text()
    # recall and classes none found: only seeds 1 and 2 have them (runs made before the figures existed)
    assert ("| symmetric0.4 | clear-lora | 3 | 74.0 ± 4.0 | 64.0 ± 5.3 | 69.0 ± 4.0 | 60.0 ± 10.0 | 0.85 ± 0.05 "
            "| 0.65 ± 0.07 (n=2) | 0.10 ± 0.00 (n=2) |") in md
    assert "+1.0 (within seed spread)" in md and "+13.0 |" in md
    summary = md[md.index("### Summary: dev-selected"):md.index("### Summary: last")]
    assert "| dataset | noise | lora | clear-lora | clear-lora[gamma=0.7] | full |" in summary
    assert "| bank | symmetric0.4 | 67.0 ± 1.0 (n=3) | 69.0 ± 4.0 (n=3) | 90.0 (n=1) |  |" in summary
    csv_text = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv_text[0].startswith("dataset,noise,noise_type,noise_rate,method,n,seeds,mixed_settings,best_mean,best_std")
    assert len(csv_text) == 1 + 5


def test_grid_expansion_filters_and_dry_run(tiny_bert, toy_files, tmp_path, capsys):
    path = write_grid(tmp_path / "g.yaml", tiny_bert, toy_files, seeds=[0, 1, 2], clean_seeds=[0],
                      methods={"lora": {}, "clear-lora": {}, "oracle-lora": {}},
                      variants=[{"base": "clear-lora", "flags": {"gamma": 0.7}}],
                      noise=["none", {"type": "symmetric", "rate": 0.2}, {"type": "asymmetric", "rate": 0.4}])
    runs = ex.load_grid(path).runs
    # clean data: once per method, no oracle (3); each noise: 4 methods x 3 seeds (24)
    assert len(runs) == 3 + 24
    assert not [r for r in runs if r.noise == "none" and r.base_method == "oracle-lora"]
    v = [r for r in runs if r.method == "clear-lora[gamma=0.7]"]
    assert v[0].name == "toy__none__clear-lora+gamma=0.7__seed0" and v[0].flags["gamma"] == 0.7
    assert v[0].config().gamma == 0.7 and v[0].config().method == "clear-lora"
    assert len(ex.select(runs, methods=["lora"])) == 7
    assert len(ex.select(runs, noise=["symmetric0.2"])) == 12 == len(ex.select(runs, noise=["symmetric"]))
    assert len(ex.select(runs, seeds=[1], methods=["clear-lora"])) == 2
    assert [r.name for r in ex.select(runs, only=["*asymmetric*oracle*seed2"])] == \
        ["toy__asymmetric0.4__oracle-lora__seed2"]
    assert ex.main(["--grid", str(path), *dirs(tmp_path), "--dry-run", "--noise", "none"]) == 0
    out = capsys.readouterr().out
    assert out.count("  new ") == 3 and "would run 3 runs, estimated" in out
    assert not (tmp_path / "work").exists(), "a dry run trains nothing"
    assert ex.main(["--grid", str(path), *dirs(tmp_path), "--dry-run", "--max-runs", "5"]) == 0
    assert "would run 5 runs" in capsys.readouterr().out
    assert ex.main(["--grid", str(path), *dirs(tmp_path), "--seeds", "7"]) == 2
    assert "match no run" in capsys.readouterr().err


def test_time_estimate_follows_the_settings(tiny_bert, toy_files, tmp_path):
    runs = ex.load_grid(write_grid(tmp_path / "g.yaml", tiny_bert, toy_files, seeds=[0],
                                   methods={"lora": {}, "clear-lora": {}, "full": {}})).runs
    est = {r.method: ex.estimate_seconds(r) for r in runs}
    c = ex.DEFAULT_COST
    step, fwd = (c["train_step"][0] + c["train_step"][1] * 12) / 32, c["forward"][1] * 12 / 32
    # 64 training samples, dev 16 + test 24, 2 epochs; clean-probability pass: 2 passes if routed, else 1
    assert math.isclose(est["lora"], c["startup_s"] + 2 * (64 * step + (40 + 64) * fwd))
    assert math.isclose(est["clear-lora"] - est["lora"], 2 * 64 * fwd)
    assert math.isclose(est["full"], c["startup_s"] + 2 * (64 * step * c["full_factor"] + (40 + 64) * fwd))


@pytest.mark.parametrize("change, message", [
    ({"methods": {"magic": {}}}, "'magic' is not one of"),
    ({"methods": {"lora": {"learnin_rate": 1e-3}}}, "unknown training flag 'learnin_rate'"),
    ({"shared": {"output_dir": "x"}}, "set by the runner"),
    ({"noise": [{"type": "symetric", "rate": 0.2}]}, "type 'symetric' is not one of"),
    ({"noise": [{"type": "symmetric", "rate": 1.5}]}, "rate must be a number in [0, 1)"),
    ({"seeds": []}, "'seeds' is missing or empty"),
    ({"seeds": [0, 0]}, "repeats a seed"),
    ({"methods": {"lora": {"num_epochs": 0}}}, "num-epochs must be a positive integer"),
    ({"variants": [{"base": "full", "flags": {"gamma": 0.7}}]}, "base 'full' is not one of the grid's methods"),
    ({"colour": "red"}, "unknown key(s) colour"),
    ({"shared": {"method": "full"}}, "'method' cannot be set here"),
    ({"methods": {"lora": {"learning_rate": "fast"}}}, "bad flag value"),
    ({"methods": {"a b": {"method": "lora"}, "a+b": {"method": "lora"}}}, "give the same folder name"),
])
def test_bad_grid_files_give_clear_errors(tiny_bert, toy_files, tmp_path, capsys, change, message):
    path = write_grid(tmp_path / "bad.yaml", tiny_bert, toy_files, **change)
    with pytest.raises(ValueError, match="bad.yaml") as e:
        ex.load_grid(path)
    assert message in str(e.value)
    assert ex.main(["--grid", str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_or_missing_grid_file(tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("methods: [lora\n")
    assert ex.main(["--grid", str(tmp_path / "broken.yaml")]) == 2
    assert "broken.yaml" in capsys.readouterr().err
    assert ex.main(["--grid", str(tmp_path / "nope.yaml")]) == 2
    assert "grid file not found" in capsys.readouterr().err
    assert ex.main(["report", "--results-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_an_option_missing_from_an_older_run_counts_as_its_default(tmp_path):
    r = tmp_path / "results"
    fake_run(r, "bank", "symmetric", 0.4, "lora", 0, 0.7, 0.7, 0.7, 0.9)  # saved before classwise_losses
    fake_run(r, "bank", "symmetric", 0.4, "lora", 1, 0.7, 0.7, 0.7, 0.9)
    cfg = tmp_path / "results" / "bank__symmetric0.4__lora__seed1" / "results.json"
    res = json.loads(cfg.read_text())
    res["config"]["classwise_losses"] = False
    cfg.write_text(json.dumps(res))
    table, _ = ex.report(r, tmp_path / "out")
    assert not table[0]["mixed_settings"]
    res["config"]["classwise_losses"] = True
    cfg.write_text(json.dumps(res))
    table, _ = ex.report(r, tmp_path / "out")
    assert table[0]["mixed_settings"]


def test_time_estimate_sizes_count_a_held_out_dev_split(tmp_path):
    from clear_fast.config import TrainConfig

    for split, n in (("train", 160), ("test", 60)):
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"t{i},c{i % 4}\n" for i in range(n)))
    cfg = TrainConfig(train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"),
                      dev_fraction=0.25, max_eval_samples=30).validate()
    assert ex._split_sizes(cfg) == (120, 30, 30)
