"""The training pipeline end to end on tiny random models (seconds), plus its formulas and errors."""
import csv
import json
import math
import re

import numpy as np
import pytest
import torch

from clear_fast.config import UserError, parse_config
from clear_fast.kernels.utils import interpreting
from clear_fast.losses import clear_loss, consistency_loss
from clear_fast.model import draw_routing_masks, layer_path
from clear_fast.train import main
from clear_fast.trainer import Run, Tokenized
from conftest import cli


def strip_times(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "epoch_s")} for r in records]


@pytest.mark.parametrize("method, extra", [
    ("clear-lora", []), ("lora", []), ("full", []), ("oracle-lora", []),
    ("clear-lora", ["--head-routing", "routed", "--clean-prob-source", "train-steps", "--eval-routing",
                    "stochastic", "--normalize-losses", "--classwise-losses"]),
])
def test_every_method_runs_end_to_end(tiny_models, toy_files, tmp_path, method, extra):
    out = tmp_path / method
    assert main(cli(tiny_models["bert"], toy_files, out, "--method", method, "--noise-rate", "0.3", *extra)) == 0
    res = json.loads((out / "results.json").read_text())
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and res["method"] == method
    assert 0.0 <= res["best_test_accuracy"] <= 1.0
    assert res["last_test_accuracy"] == recs[-1]["test_accuracy"]
    assert all(0.0 <= r["clean_classes_none_found"] <= 1.0 and 0.0 <= r["clean_class_mean_recall"] <= 1.0
               for r in recs)
    noise = json.loads((out / "noise.json").read_text())
    assert len(noise["clean_mask"]) == 160
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 160
    # the clean mask says exactly which observed labels differ from the true ones
    assert all(noise["clean_mask"][int(r["index"])] == (r["observed_label"] == r["true_label"]) == (r["flipped"] == "0")
               for r in rows)
    assert 0 < sum(noise["clean_mask"]) < 160
    # clean_loss_auroc: the pass's losses ranked, what per_sample.csv orders ties of p_clean by
    from sklearn.metrics import roc_auc_score

    losses = {int(r["index"]): float(r["loss"]) for r in rows}
    assert recs[-1]["clean_loss_auroc"] == pytest.approx(
        roc_auc_score(noise["clean_mask"], [-losses[i] for i in range(160)]), abs=2e-3)  # csv: 6 digits
    # train_ce: the loss without the consistency term (a CE against the teacher, never below 0)
    for r in recs:
        teacher = method in ("clear-lora", "oracle-lora") and r["phase"] == "train"
        assert r["train_ce"] < r["train_loss"] if teacher else r["train_ce"] == pytest.approx(r["train_loss"])
    p = [float(r["clean_probability"]) for r in rows]
    assert p == sorted(p), "per_sample.csv must list the likeliest label errors first"
    assert (out / "plots" / "curves.png").exists() and (out / "plots" / "loss_hist_epoch03.png").exists()
    assert (out / ("model" if method == "full" else "adapter")).is_dir()
    if method in ("clear-lora", "oracle-lora"):
        assert recs[0]["phase"] == "warm-up" and recs[1]["phase"] == "train"
        assert 0.0 < recs[0]["routed_fraction"] <= 1.0
    if method == "oracle-lora":
        # after warm-up only clean samples are routed, each layer w.p. gamma
        frac_clean = np.mean(noise["clean_mask"])
        assert abs(recs[2]["routed_fraction"] - 0.85 * frac_clean) < 0.08
    if method == "lora":
        assert recs[0]["routed_fraction"] == 1.0
    saved = out / ("model" if method == "full" else "adapter")
    assert json.loads((saved / "labels.json").read_text())["max_length"] == 16
    if method == "full":  # model/ loads in transformers alone: its tokenizer beside it
        from transformers import AutoTokenizer

        text = "the filler word"
        assert AutoTokenizer.from_pretrained(saved)(text) == AutoTokenizer.from_pretrained(tiny_models["bert"])(text)


@pytest.mark.parametrize("arch, targets", [("roberta", {"query", "value"}), ("distilbert", {"q_lin", "v_lin"})])
def test_other_architectures_run(tiny_models, toy_files, tmp_path, arch, targets):
    """Default LoRA targets follow peft's choice for the model type; two layers, two routed modules each."""
    cfg = parse_config(cli(tiny_models[arch], toy_files, tmp_path / arch, "--num-epochs", "2", "--no-plots"))
    run = Run(cfg)
    run.run()
    assert {n.split(".")[-1] for n in run.router.module_names} == targets
    assert [len(modules) for modules in run.router.layers] == [2, 2]
    adapter_cfg = json.loads((tmp_path / arch / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == targets


def test_learns_the_toy_task(tiny_models, toy_files, tmp_path):
    """Not only runs: with clean labels the tiny BERT learns a keyword task well above chance (0.25)."""
    main(cli(tiny_models["bert"], toy_files, tmp_path / "l", "--method", "full", "--noise-type", "none",
             "--noise-rate", "0", "--num-epochs", "4", "--learning-rate", "1e-3"))
    res = json.loads((tmp_path / "l" / "results.json").read_text())
    assert res["best_test_accuracy"] > 0.6


def _interrupt_after_epoch_2(monkeypatch):
    """Make the next runs stop (Ctrl-C) right after epoch 2's checkpoint; returns what undoes it."""
    original = Run.save_checkpoint

    def save_then_interrupt(self, epoch, state):
        original(self, epoch, state)
        if epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", save_then_interrupt)
    return lambda: monkeypatch.setattr(Run, "save_checkpoint", original)


def test_resume_gives_the_same_metrics(tiny_models, toy_files, tmp_path, monkeypatch, capsys):
    args = cli(tiny_models["bert"], toy_files, tmp_path / "full_run", "--no-save-adapter", "--no-plots")
    assert main(args) == 0
    # interrupt a second run right after epoch 2 is checkpointed, then resume it
    out2 = tmp_path / "interrupted"
    args2 = cli(tiny_models["bert"], toy_files, out2, "--no-save-adapter", "--no-plots")
    restore = _interrupt_after_epoch_2(monkeypatch)
    assert main(args2) == 130
    assert "epoch 2 of 3 is checkpointed" in capsys.readouterr().err
    assert not (out2 / "results.json").exists()
    restore()
    assert main(args2) == 2, "a run already in the folder must not be silently replaced"
    assert main(args2 + ["--resume"]) == 0
    read = lambda d: strip_times([json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()])
    a, b = read(tmp_path / "full_run"), read(out2)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float):
                assert math.isclose(va, vb, rel_tol=1e-5, abs_tol=1e-6), k
            elif k != "mixture":
                assert va == vb, k


def test_saved_adapter_reloads_in_peft_with_equal_predictions(tiny_models, toy_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "a"
    cfg = parse_config(cli(tiny_models["bert"], toy_files, out, "--method", "lora", "--num-epochs", "2"))
    run = Run(cfg)
    run.run()
    batch = run.test.batch(np.arange(len(run.test)), "cpu")
    run.model.eval()
    with torch.no_grad():
        ours = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=4,
                                                              ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with peft_model.disable_adapter():
            untrained = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, untrained, atol=1e-3), "the saved adapter must carry the trained weights"


def test_own_files_keep_their_labels_and_per_sample_csv_claims_no_truth(tiny_models, toy_files, tmp_path, capsys):
    out = tmp_path / "own"
    args = cli(tiny_models["bert"], toy_files, out, "--num-epochs", "2", "--no-plots", "--no-save-adapter")
    assert args[:2] == ["--noise-type", "symmetric"]
    assert main(args[2:]) == 0  # the user's own files, no noise flag
    printed = capsys.readouterr().out
    assert "4 classes, training on 160, dev 40, test 60; labels as given (no noise injected)" in printed
    assert re.search(r"model: \S+ \(bert\), LoRA r 4 on query, value in 2 layers \(4 modules\): [\d,]+ of "
                     r"[\d,]+ parameters trained \(\d+\.\d\d %: the adapters and the head\)", printed), printed
    assert "per_sample.csv lists the training samples likeliest to be mislabelled first" in printed
    noise = json.loads((out / "noise.json").read_text())
    assert noise["noise_type"] == "none" and all(noise["clean_mask"])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["noise_type"], cfg["noise_rate"], cfg["max_train_samples"]) == ("none", 0.0, 0)
    with open(out / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "true_label" not in rows[0] and "flipped" not in rows[0]
    with open(toy_files / "train.csv", newline="") as f:
        given = list(csv.DictReader(f))
    assert {(r["text"], r["observed_label"]) for r in rows} == {(r["text"], r["label"]) for r in given}, \
        "the labels must be the file's"
    # row: the sample's data row in the file, as predict numbers them
    assert all(given[int(r["row"]) - 1]["text"] == r["text"] for r in rows)
    assert sorted(int(r["row"]) for r in rows) == list(range(1, 161))


def test_max_length_beyond_the_model_is_cut_to_it_with_a_warning(tiny_models, toy_files, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clear_fast.model import text_length_limit

    limits = {}
    for arch in ("bert", "roberta"):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_models[arch], num_labels=2)
        limits[arch] = text_length_limit(model, AutoTokenizer.from_pretrained(tiny_models[arch]))
    assert limits == {"bert": 80, "roberta": 79}  # 80 positions; RoBERTa's start after padding_idx 0
    long_file = tmp_path / "train.csv"
    long_file.write_text((toy_files / "train.csv").read_text() + " ".join(["alpha"] * 300) + ",class_0\n")
    args = cli(tiny_models["roberta"], toy_files, tmp_path / "o", "--num-epochs", "1", "--warmup-epochs", "0",
               "--no-plots", "--no-save-adapter", "--train-file", str(long_file), "--max-length", "400")
    assert main(args) == 0
    warning = "warning: --max-length 400 is more than this model takes: texts are cut at 79 tokens"
    assert warning in capsys.readouterr().err


def test_classes_without_a_likely_clean_sample_are_warned_of_once(tiny_models, toy_files, tmp_path, monkeypatch):
    from clear_fast import metrics, trainer

    assert metrics.classes_without_likely_clean([0.9, 0.2, 0.6, 0.1, 0.4], [0, 1, 2, 1, 3]) == [1, 3]
    assert metrics.classes_without_likely_clean([0.9, 0.7], [0, 1]) == []
    run = Run(parse_config(cli(tiny_models["bert"], toy_files, tmp_path / "o", "--num-epochs", "4",
                               "--warmup-epochs", "1", "--no-plots", "--no-save-adapter")))
    real = trainer.clean_probability

    def class_1_looks_noisy(losses, **kw):
        p, gmm = real(losses, **kw)
        return torch.where(run.train.labels.to(p.device) == 1, 0.1, 0.9).to(p.dtype), gmm
    monkeypatch.setattr(trainer, "clean_probability", class_1_looks_noisy)
    with pytest.warns(UserWarning, match=r"epoch 1: 1 of 4 classes have no sample whose clean probability is "
                                         r"above 0.5 \(class_1\).*--classwise-losses") as caught:
        run.run()
    assert sum("clean probability is above" in str(w.message) for w in caught) == 1, "once a run"


def test_resume_without_a_dev_split_and_of_a_run_made_with_the_old_defaults(tiny_models, toy_files, tmp_path,
                                                                            monkeypatch):
    # Own files, no dev split; the saved settings are those an older version defaulted to on any data
    # (2000 samples, symmetric 0.4), which the same command now resolves otherwise.
    args = cli(tiny_models["bert"], toy_files, tmp_path / "r", "--no-plots", "--no-save-adapter")
    for flag in ("--noise-type", "--dev-file", "--max-train-samples"):  # none of them given
        i = args.index(flag)
        del args[i:i + 2]
    old_defaults = ["--noise-type", "symmetric", "--noise-rate", "0.4", "--max-train-samples", "2000"]
    restore = _interrupt_after_epoch_2(monkeypatch)
    assert main(args + old_defaults) == 130
    restore()
    assert main(args + ["--resume"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["noise_type"], cfg["noise_rate"], cfg["max_train_samples"]) == ("symmetric", 0.4, 2000)
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(args + ["--resume", "--overwrite"]) == 2  # flags given now still must match


def test_a_run_from_a_config_made_without_validate_gets_the_data_defaults(toy_files, tmp_path):
    from clear_fast.config import TrainConfig

    run = Run(TrainConfig(train_file=str(toy_files / "train.csv"), test_file=str(toy_files / "test.csv"),
                          output_dir=str(tmp_path / "o")))
    assert (run.cfg.noise_type, run.cfg.noise_rate, run.cfg.max_train_samples) == ("none", 0.0, 0)


def test_consistency_loss_matches_its_formula():
    torch.manual_seed(1)
    z, t, T = torch.randn(8, 5), torch.randn(8, 5), 2.0
    q = torch.softmax(t / T, -1)
    expected = T ** 2 * torch.mean(-(q * torch.log_softmax(z / T, -1)).sum(-1))
    assert torch.allclose(consistency_loss(z, t, T), expected)
    y = torch.randint(0, 5, (8,))
    total, ce = clear_loss(z, y, t, weight=0.5, temperature=T)
    assert torch.allclose(total, torch.nn.functional.cross_entropy(z, y) + 0.5 * expected)
    assert torch.allclose(clear_loss(z, y)[0], torch.nn.functional.cross_entropy(z, y))


def test_routing_masks_follow_their_probabilities():
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.3, 0.85, 1.0]).repeat_interleave(5000)
    m = draw_routing_masks(p, 6)
    assert m.shape == (20000, 6) and m.dtype == torch.bool
    rates = m.float().view(4, 5000, 6).mean((1, 2))
    assert torch.allclose(rates, torch.tensor([0.0, 0.3, 0.85, 1.0]), atol=0.01)
    # layers are drawn independently: agreement between two layers at p=0.3 is 0.3^2 + 0.7^2
    a = m[5000:10000]
    assert abs((a[:, 0] == a[:, 1]).float().mean().item() - 0.58) < 0.03


def test_layer_path_from_module_names():
    assert layer_path("bert.encoder.layer.3.attention.self.query") == "bert.encoder.layer.3"
    assert layer_path("roberta.encoder.layer.11.attention.self.value") == "roberta.encoder.layer.11"
    assert layer_path("distilbert.transformer.layer.0.attention.q_lin") == "distilbert.transformer.layer.0"
    # an encoder-decoder's encoder and decoder layers are distinct; nested lists' layers too
    assert layer_path("encoder.block.0.layer.0.SelfAttention.q") == "encoder.block.0"
    assert layer_path("decoder.block.0.layer.1.EncDecAttention.q") == "decoder.block.0"
    assert layer_path("funnel.encoder.blocks.0.1.attention.q_head") == "funnel.encoder.blocks.0.1"
    # parallel lists (XLM's attentions.i and ffns.i): one layer per index
    assert layer_path("transformer.attentions.1.q_lin") == layer_path("transformer.ffns.1.lin1") == "transformer.*.1"
    assert layer_path("layers.5.attn.q") == "layers.5"
    with pytest.raises(ValueError, match="cannot tell which transformer layer"):
        layer_path("query")


@pytest.mark.parametrize("flags, message", [
    (["--noise-rate", "1.0"], "noise-rate"),
    (["--batch-size", "0"], "batch-size"),
    (["--num-epochs", "-1"], "num-epochs"),
    (["--method", "magic"], "method"),
    (["--compile", "--compile-mode", "fast"], "compile-mode"),
])
def test_bad_flags_give_clear_errors(flags, message, capsys):
    assert main(["--no-progress"] + flags) == 2
    assert message in capsys.readouterr().err


def test_missing_file_and_unknown_model_are_clear_errors(tiny_models, toy_files, tmp_path, capsys):
    assert main(cli(tiny_models["bert"], toy_files, tmp_path / "x", "--train-file", str(tmp_path / "nope.csv"))) == 2
    assert "nope.csv" in capsys.readouterr().err
    assert main(cli("no-such-org/no-such-model", toy_files, tmp_path / "y")) == 2
    assert "no-such-org/no-such-model" in capsys.readouterr().err


def test_config_file_with_command_line_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: lora\nnum_epochs: 9\ngamma: 0.5\n")
    cfg = parse_config(["--config", str(f), "--num-epochs", "2"])
    assert (cfg.method, cfg.num_epochs, cfg.gamma) == ("lora", 2, 0.5)
    f.write_text("not_a_flag: 1\n")
    with pytest.raises(ValueError, match="not_a_flag"):
        parse_config(["--config", str(f)])


def test_head_shield_blocks_only_the_head_gradient_of_shielded_samples(tiny_models):
    from transformers import AutoModelForSequenceClassification

    from clear_fast.model import HeadShield, inject_routed_lora

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=4,
                                                               ignore_mismatched_sizes=True)
    router = inject_routed_lora(model, None, r=2, lora_alpha=2)
    for m in router.modules():
        torch.nn.init.normal_(m.lora_B)
    ids = torch.randint(1000, 2000, (2, 7))
    plain = model(input_ids=ids).logits.detach()
    shield = HeadShield(model)
    shield.mask = torch.tensor([True, False])
    logits = model(input_ids=ids).logits
    assert torch.equal(logits.detach(), plain), "shielding changes gradients, never values"

    def grads(sample):
        model.zero_grad()
        model(input_ids=ids).logits[sample].sum().backward()
        return model.classifier.weight.grad.abs().sum().item(), router.modules()[0].lora_B.grad.abs().sum().item()

    head0, lora0 = grads(0)
    head1, lora1 = grads(1)
    assert head0 > 0 and lora0 > 0
    assert head1 == 0.0 and lora1 > 0, "a shielded sample still trains the adapters, not the head"


def test_compiled_model_trains_and_matches_eager(tiny_models, toy_files, tmp_path):
    """--compile: torch.compile traces the model with routed layers; its outputs equal eager's."""
    cfg = parse_config(cli(tiny_models["bert"], toy_files, tmp_path / "c", "--compile", "--num-epochs", "2",
                           "--no-plots", "--no-save-adapter"))
    run = Run(cfg)
    with pytest.warns(UserWarning, match="--compile on the CPU: the first epoch spends minutes compiling"):
        run.run()
    assert run.forward_model is not run.model
    batch = run.test.batch(np.arange(8), "cpu")
    run.model.eval()
    first = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]] * 2, dtype=torch.bool)
    held = None
    for masks in (first, ~first):  # the second set overwrites the first's buffer in place
        run.router.set_masks(masks)
        now = [m.routing_mask for m in run.router.modules()]
        assert held is None or all(a is b for a, b in zip(now, held)), "a compiled run's masks moved"
        held = now
        with torch.no_grad():
            compiled = run.forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            eager = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    run.router.set_masks(None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reduce_overhead_steps_replay_their_cuda_graphs(tmp_path):
    """--compile-mode reduce-overhead: clear-lora steps with new routing masks each replay the
    recorded CUDA graphs. Masks in new tensors each step made every step record again (dynamo makes
    module tensor attributes static inputs); a re-record or a skipped graph raises here. A random
    model: the GPU machine has no offline MiniLM for the tiny_models fixture's tokenizer."""
    import torch._inductor.config
    from torch._dynamo.utils import counters
    from transformers import BertConfig, BertForSequenceClassification

    from clear_fast.config import TrainConfig
    from clear_fast.model import inject_routed_lora

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=4))
    router = inject_routed_lora(model)
    run = Run(TrainConfig(method="clear-lora", device="cuda", compile=True, compile_mode="reduce-overhead",
                          progress=False, output_dir=str(tmp_path)).validate())
    run.attach_model(model.cuda(), router)
    run.model.train()
    batch = {"input_ids": torch.randint(0, 100, (16, 12), device="cuda"),
             "attention_mask": torch.ones(16, 12, dtype=torch.long, device="cuda"),
             "labels": torch.randint(0, 4, (16,), device="cuda")}
    p = torch.linspace(0.1, 0.9, 16, device="cuda")
    counters.clear()
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True,
                                       "triton.cudagraph_unexpected_rerecord_limit": 0}):
        losses = [run.train_step(batch, p)[0].item() for _ in range(6)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert all(np.isfinite(losses)) and len(set(losses)) > 1, losses


def _run_with_live_adapters(tiny_models, toy_files, out, arch="bert", *extra):
    """A loaded clear-lora Run whose adapters change the output (lora_B is zero at initialisation)."""
    run = Run(parse_config(cli(tiny_models[arch], toy_files, out, "--no-plots", "--eval-batch-size", "48",
                               *extra)))
    run.load()
    torch.manual_seed(0)
    for module in run.router.modules():
        torch.nn.init.normal_(module.lora_B, std=5.0)
    return run


def _predict(run, seed, passes=3):
    torch.manual_seed(seed)
    return run.predict(run.train, 0.6, passes, "pass")


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "roformer"])
def test_shared_prefix_pass_equals_separate_passes(tiny_models, toy_files, tmp_path, arch, monkeypatch):
    """The ensemble passes run together with shared prefixes give the logits of the passes run one
    after another (same random stream, so the same masks), computing fewer rows in later layers."""
    import clear_fast.model as model_module

    run = _run_with_live_adapters(tiny_models, toy_files, tmp_path / arch, arch)
    computed = []
    forward = model_module._SharedPrefixLayer.forward

    def counting(self, hidden_states, *args, **kwargs):
        computed.append((len(self.rows), self.total, torch.backends.cuda.cudnn_sdp_enabled()))
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(model_module._SharedPrefixLayer, "forward", counting)
    checked, masked_logits = [], run._masked_logits  # separate passes: only the first batch's check

    def check_pass(*args):
        checked.append(torch.backends.cuda.cudnn_sdp_enabled())
        return masked_logits(*args)

    monkeypatch.setattr(run, "_masked_logits", check_pass)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    shared = _predict(run, seed=1)
    assert run._share_prefix and run._share_prefix_checked
    assert sum(r for r, _, _ in computed) < sum(t for _, t, _ in computed)  # some rows were copied
    # cuDNN's attention (a plan per new row count) is off inside the shared pass and its check, back on after
    assert checked and not any(checked) and not any(cudnn for _, _, cudnn in computed)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.undo()
    run._share_prefix = False
    separate = _predict(run, seed=1)
    err = float((shared - separate).abs().max())
    other_masks = float((separate - _predict(run, seed=2)).abs().max())
    assert err < 1e-6 and other_masks > 100 * err + 1e-4, (err, other_masks)  # other masks differ: a real check


def test_layer_paths_only_for_one_list_of_layers():
    """The shared-prefix pass needs the routed layers as entries of one nn.ModuleList; elsewhere
    layer_paths is None and the pass runs its ensemble passes one after another."""
    from torch import nn

    from clear_fast.model import inject_routed_lora

    def block():
        return nn.ModuleDict({"query": nn.Linear(4, 4), "value": nn.Linear(4, 4)})

    class Encoder(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self, two_lists):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.encoder = nn.Module()
            self.backbone.encoder.layer = nn.ModuleList([block(), block()])
            if two_lists:
                self.backbone.decoder = nn.Module()
                self.backbone.decoder.layer = nn.ModuleList([block(), block(), block()])

    router = inject_routed_lora(Encoder(False), ["query", "value"], 2, 2)
    assert router.layer_paths == ["backbone.encoder.layer.0", "backbone.encoder.layer.1"]
    assert inject_routed_lora(Encoder(True), ["query", "value"], 2, 2).layer_paths is None


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_shared_prefix_pass_falls_back_to_separate_passes(tiny_models, toy_files, tmp_path, fault, monkeypatch):
    """A layer the sharing cannot drive (an error, or logits that differ on the first batch's check):
    a warning, separate passes for the rest of the run, and still the right logits."""
    import clear_fast.model as model_module

    run = _run_with_live_adapters(tiny_models, toy_files, tmp_path / fault)
    run._share_prefix = False
    separate = _predict(run, seed=1)
    run._share_prefix = True
    forward = model_module._SharedPrefixLayer.forward

    def faulty(self, hidden_states, *args, **kwargs):
        if fault == "raises":
            raise TypeError("unexpected layer argument")
        out = forward(self, hidden_states, *args, **kwargs)
        return (out[0] * 1.5, *out[1:]) if isinstance(out, tuple) else out * 1.5

    monkeypatch.setattr(model_module._SharedPrefixLayer, "forward", faulty)
    with pytest.warns(UserWarning, match="shared-prefix pass is off"):
        got = _predict(run, seed=1)
    assert not run._share_prefix
    torch.testing.assert_close(got, separate, rtol=1e-5, atol=1e-5)


def test_clean_detection_per_class_figures_by_hand():
    from clear_fast.metrics import clean_detection

    p = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.95])
    clean = np.array([1, 1, 1, 1, 0, 1, 0], dtype=bool)
    true = np.array([0, 0, 1, 1, 1, 2, 2])
    det = clean_detection(p, clean, true_labels=true)
    # clean samples: class 0 -> found 2/2, class 1 -> 0/2, class 2 -> 0/1
    assert det["recall"] == pytest.approx(2 / 5)
    assert det["class_mean_recall"] == pytest.approx((1 + 0 + 0) / 3)
    assert det["classes_none_found"] == pytest.approx(2 / 3)
    assert "class_mean_recall" not in clean_detection(p, clean)


@pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("error:clean-probability pass")  # the shared-prefix pass must not fall back
def test_training_on_the_gpu_code_path_matches_the_cpu_path(tiny_models, toy_files, tmp_path, monkeypatch,
                                                             record_calls):
    """CLEAR_FAST_AUTO_BACKEND=triton: the whole method (routed layers, fused loss, the mixture's
    kernel, the shared-prefix pass) runs the kernels a GPU runs, through the interpreter, and
    trains as the CPU path does: the same routing, accuracies and clean-detection per epoch."""
    import clear_fast.mixture
    from clear_fast.kernels import clear_loss as loss_kernels, routed_lora

    monkeypatch.delenv("CLEAR_FAST_AUTO_BACKEND", raising=False)  # the first run is the CPU path
    record_calls(routed_lora, "lora_forward_", "lora_backward")
    record_calls(loss_kernels, "clear_loss_forward")
    used = record_calls(clear_fast.mixture, "em_step_triton")
    records = {}
    for backend in ("torch", "triton"):
        if backend == "triton":
            monkeypatch.setenv("CLEAR_FAST_AUTO_BACKEND", "triton")
        out = tmp_path / backend
        assert main(cli(tiny_models["bert"], toy_files, out, "--noise-rate", "0.3", "--no-plots",
                        "--no-save-adapter", "--num-epochs", "2")) == 0
        records[backend] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert set(used) == (set() if backend == "torch" else
                        {"lora_forward_", "lora_backward", "clear_loss_forward", "em_step_triton"})
    for cpu, gpu_path in zip(*records.values()):
        assert gpu_path["routed_fraction"] == cpu["routed_fraction"]
        for key in ("test_accuracy", "clean_recall", "clean_precision"):
            assert gpu_path[key] == cpu[key], key
        # (measured 1e-7 relative: rounding; the kernels' gradients are tested one by one elsewhere)
        assert abs(gpu_path["train_loss"] - cpu["train_loss"]) < 1e-5 * abs(cpu["train_loss"])


def test_batches_pad_each_text_to_the_longest_of_the_batch():
    """Tokenized.batch (vectorised, one copy) against the batch written out text by text: ids
    padded with the pad id, mask 1 on real tokens, labels and index of the chosen samples."""
    rng = np.random.default_rng(0)
    texts = [rng.integers(5, 1000, k).tolist() for k in (3, 1, 7, 7, 2, 5)]
    split = Tokenized(texts, [0, 1, 2, 0, 1, 2], pad_id=4)
    for index in ([2, 0, 5], [1], [4, 1], list(range(6))):
        got = split.batch(index, "cpu")
        width = max(len(texts[i]) for i in index)
        ids = torch.tensor([texts[i] + [4] * (width - len(texts[i])) for i in index])
        mask = torch.tensor([[1] * len(texts[i]) + [0] * (width - len(texts[i])) for i in index])
        assert torch.equal(got["input_ids"], ids) and got["input_ids"].dtype == torch.long
        assert torch.equal(got["attention_mask"], mask) and got["attention_mask"].dtype == torch.long
        assert got["labels"].tolist() == [[0, 1, 2, 0, 1, 2][i] for i in index]
        assert got["index"].tolist() == index
    assert len(split) == 6 and len(Tokenized([], [])) == 0


def test_batches_padded_to_a_multiple_stop_at_the_longest_allowed():
    """--pad-to-multiple-of: the batch length rounds up to the multiple (extra columns are padding
    with mask 0), never beyond max_width, never below the longest text."""
    texts = [[7] * k for k in (3, 9, 14)]
    split = Tokenized(texts, [0, 1, 0], pad_id=4, pad_to_multiple_of=8, max_width=12)
    assert split.batch([0], "cpu")["input_ids"].shape == (1, 8)
    b = split.batch([0, 1], "cpu")
    assert b["input_ids"].shape == (2, 12)  # 9 -> 16, capped at 12
    assert b["attention_mask"].sum(1).tolist() == [3, 9] and b["input_ids"][1, 9:].eq(4).all()
    assert split.batch([2], "cpu")["input_ids"].shape == (1, 14)  # longer than the cap (not truncated here)
    assert Tokenized(texts, [0, 1, 0], pad_to_multiple_of=8).batch([1], "cpu")["input_ids"].shape == (1, 16)


def test_padding_to_a_multiple_changes_only_rounding(tiny_models, toy_files, tmp_path):
    """A model's logits on batches padded to a multiple equal those on batches padded to their
    longest text, up to rounding; the option is validated."""
    run = Run(parse_config(cli(tiny_models["bert"], toy_files, tmp_path / "a", "--no-plots")))
    run.load()
    run.model.eval()
    index = np.arange(len(run.test))
    plain = run.test.batch(index, "cpu")
    run.test.multiple = 16
    padded = run.test.batch(index, "cpu")
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    with torch.no_grad():
        a, b = (run.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits for x in (plain, padded))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="--pad-to-multiple-of must be a positive integer"):
        parse_config(cli(tiny_models["bert"], toy_files, tmp_path / "b", "--pad-to-multiple-of", "0"))


def _tree(folder):
    """Every file below folder with its bytes: a run folder's exact state."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_touches_nothing_until_loaded_then_removes_every_output(tiny_models, toy_files, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(cli(tiny_models["bert"], toy_files, out, "--num-epochs", "1")) == 0
    assert "plots/, adapter/" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    (out / ".results.json.x1.tmp").write_text("left by an interrupted write")
    before = _tree(out)
    # a start that fails (unknown model, a bad data file) leaves the old run exactly as it was
    assert main(cli("no-such-org/no-such-model", toy_files, out, "--overwrite")) == 2
    assert main(cli(tiny_models["bert"], toy_files, out, "--overwrite", "--train-file", str(tmp_path))) == 2
    assert _tree(out) == before
    # a new run with --overwrite and fewer outputs leaves none of the old run's, and the user's file
    assert main(cli(tiny_models["bert"], toy_files, out, "--num-epochs", "1", "--overwrite", "--no-plots",
                    "--no-save-adapter")) == 0
    final = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("outputs in"))
    assert "results.json" in final and "plots/" not in final and "adapter/" not in final
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "noise.json",
                                                     "notes.txt", "per_sample.csv", "results.json"]
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_start_writes_nothing(tiny_models, toy_files, tmp_path):
    out = tmp_path / "new"
    assert main(cli("no-such-org/no-such-model", toy_files, out)) == 2
    assert not out.exists()
    assert main(cli(tiny_models["bert"], toy_files, out, "--num-epochs", "1", "--no-plots",
                    "--no-save-adapter")) == 0, "the corrected command runs: nothing was left in its way"


def test_a_run_stopped_before_its_first_checkpoint(tiny_models, toy_files, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the first epoch: the advice says there is no checkpoint; the folder then holds only
    config.json and noise.json, which a plain rerun and --resume explain, and --overwrite restarts."""
    out = tmp_path / "o"
    args = cli(tiny_models["bert"], toy_files, out, "--num-epochs", "1", "--no-plots", "--no-save-adapter")
    train_epoch = Run.train_epoch

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "train_epoch", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and "--overwrite" in err and "is checkpointed" not in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "noise.json"]
    monkeypatch.setattr(Run, "train_epoch", train_epoch)
    assert main(args) == 2
    assert "unfinished run that never checkpointed" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err and "--overwrite instead of --resume" in err
    assert main(args + ["--overwrite"]) == 0


def test_interrupted_while_loading_says_nothing_was_written(tiny_models, toy_files, tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "load", interrupted)
    assert main(cli(tiny_models["bert"], toy_files, tmp_path / "o")) == 130
    assert "nothing was written" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_resume_refuses_other_data_and_accepts_the_run_folder_however_named(tiny_models, toy_files, tmp_path,
                                                                              capsys):
    train = tmp_path / "train.csv"
    lines = (toy_files / "train.csv").read_text().splitlines(keepends=True)
    train.write_text("".join(lines))
    out = tmp_path / "o"
    args = lambda o, *extra: cli(tiny_models["bert"], toy_files, o, "--train-file", str(train), "--num-epochs", "1",
                                 "--no-plots", "--no-save-adapter", "--resume", *extra)
    assert main(args(out)[:-1]) == 0
    # the folder is the run: another spelling of it, or the folder moved, resumes it
    assert main(args(str(out) + "/")) == 0
    out.rename(tmp_path / "moved")
    assert main(args((tmp_path / "moved").resolve())) == 0
    capsys.readouterr()
    train.write_text("".join(lines[:121]))
    assert main(args(tmp_path / "moved")) == 2
    assert "the training data (160 samples then, 120 samples now)" in capsys.readouterr().err
    train.write_text("".join(lines[:1] + lines[2:] + lines[1:2]))  # the same rows, another order
    assert main(args(tmp_path / "moved")) == 2
    assert "the training data (as many samples, 160, but other texts or labels)" in capsys.readouterr().err


def test_divergence_is_named_with_its_fix(tiny_models, toy_files, tmp_path, monkeypatch, capsys):
    """Non-finite per-sample losses: one message saying training diverged and what to lower."""
    predict = Run.predict

    def blown_up(self, split, gamma, passes, desc):
        logits = predict(self, split, gamma, passes, desc)
        return logits * float("nan") if desc == "clean-probability pass" else logits

    monkeypatch.setattr(Run, "predict", blown_up)
    assert main(cli(tiny_models["bert"], toy_files, tmp_path / "o", "--num-epochs", "1", "--bf16")) == 2
    err = capsys.readouterr().err
    assert "training diverged: 160 of 160 per-sample training losses are NaN" in err
    assert "lower --learning-rate (this run: 0.003)" in err and "without --bf16" in err


def test_model_loading_is_quiet_and_restores_transformers_settings():
    """No loading bar or peft/transformers deprecation warning inside; the user's settings after."""
    import warnings

    from transformers.utils import logging as hf_logging

    from clear_fast.model import quiet_transformers

    hf_logging.enable_progress_bar()
    before = hf_logging.get_verbosity()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_transformers():
            assert not hf_logging.is_progress_bar_enabled()
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.warn("another warning", FutureWarning)
    assert [str(w.message) for w in seen] == ["another warning"]
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == before


def test_training_subset_missing_classes_warns_in_one_line(tiny_models, toy_files, tmp_path, capsys):
    """3 training samples of a 4-class task: the run goes on, with a one-line warning that says why
    and what to raise (the CLI prints clear_fast's warnings so, other libraries' as they do)."""
    args = cli(tiny_models["bert"], toy_files, tmp_path / "o", "--num-epochs", "1", "--no-plots",
               "--no-save-adapter")
    args[args.index("--max-train-samples") + 1] = "3"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert ("warning: the training set (3 samples) holds no sample of 1 of the 4 classes: raise "
            "--max-train-samples to at least 4") in err
    assert "UserWarning" not in err and "trainer.py" not in err


def test_tf32_sets_matmul_precision_for_the_run_on_a_gpu_only(tiny_models, toy_files, tmp_path, monkeypatch):
    """--tf32: float32 products in TF32 while a GPU run runs, as before afterwards (also after an
    error); on the CPU a warning and nothing changed."""
    seen = []
    monkeypatch.setattr(Run, "_run", lambda self: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    run = Run(parse_config(cli(tiny_models["bert"], toy_files, tmp_path / "t", "--tf32", "--device", "cpu")))
    with pytest.warns(UserWarning, match="--tf32 has no effect on the CPU"):
        run.run()
    run.device = torch.device("cuda")  # what run() reads; _run is replaced, so nothing touches a GPU
    run.run()
    assert seen == [before, "high"] and torch.get_float32_matmul_precision() == before

    def fail(self):
        raise RuntimeError("stopped")

    monkeypatch.setattr(Run, "_run", fail)
    with pytest.raises(RuntimeError, match="stopped"):
        run.run()
    assert torch.get_float32_matmul_precision() == before


def test_instance_noise_embeddings_use_ieee_products(tiny_models, toy_files, tmp_path, monkeypatch):
    """The sentence embeddings that draw instance-dependent noise are computed in IEEE fp32 whatever
    the matmul precision (--tf32), so a TF32 run trains on the same noisy labels."""
    from clear_fast import trainer

    seen = []

    def embeddings(model, batches):
        seen.append(torch.get_float32_matmul_precision())
        return torch.randn(sum(len(b["index"]) for b in batches), 8)

    monkeypatch.setattr(trainer, "sentence_embeddings", embeddings)
    run = Run(parse_config(cli(tiny_models["bert"], toy_files, tmp_path / "i", "--noise-type", "instance")))
    with trainer.float32_matmul_precision("high"):
        run.load()
        assert torch.get_float32_matmul_precision() == "high"
    assert seen == ["highest"]


def test_dev_fraction_holds_out_a_dev_split(tiny_models, toy_files, tmp_path, capsys):
    """--dev-fraction: data without a dev split gets one from the training set, stratified, before
    noise is injected (its labels as given); refused where a dev split exists."""
    with_dev = cli(tiny_models["bert"], toy_files, tmp_path / "d", "--num-epochs", "2", "--no-plots",
                   "--no-save-adapter", "--dev-fraction", "0.25")
    at = with_dev.index("--dev-file")
    run = Run(parse_config(with_dev[:at] + with_dev[at + 2:]))
    results = run.run()
    assert (len(run.train), len(run.dev)) == (120, 40)  # of 160 training rows, 10 of each class held out
    from clear_fast.data import hold_out, load_dataset

    given = load_dataset(train_file=toy_files / "train.csv", test_file=toy_files / "test.csv")
    rest, held = hold_out(given.train, 0.25, seed=0)  # --data-seed 0
    assert np.bincount(held.labels).tolist() == [10] * 4
    assert torch.equal(run.dev.labels, torch.as_tensor(held.labels))  # dev labels as given
    assert torch.equal(run.true_labels, torch.as_tensor(rest.labels))  # training on the rest ...
    assert not run.clean_mask.all()  # ... with the noise in it
    assert any("held out of the training set" in n for n in results["data_notes"])
    assert run.train_split.rows.tolist() == rest.rows.tolist()  # rows of the file, the held-out ones missing
    records = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["dev_accuracy"] is not None for r in records)
    assert main(with_dev) == 2  # toy_files has a dev file
    assert "--dev-fraction holds out a dev split for data without one" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"banking77 has a dev split \(1000 samples\)"):
        Run(parse_config(["--dev-fraction", "0.1", "--output-dir", str(tmp_path / "b")])).load()


def test_per_sample_rows_point_at_the_files_lines(tiny_models, toy_files, tmp_path):
    """per_sample.csv's row is the sample's line in a JSON-lines file (blank lines counted) through a
    dev hold-out and a training subset, where it differs from the position in the training set."""
    with open(toy_files / "train.csv", newline="") as f:
        records = list(csv.DictReader(f))
    lines = []
    for k, r in enumerate(records):
        lines += [json.dumps(r)] + ([""] if k % 7 == 0 else [])  # blank lines shift the line numbers
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    args = cli(tiny_models["bert"], toy_files, tmp_path / "r", "--num-epochs", "2", "--no-plots", "--no-save-adapter",
               "--dev-fraction", "0.2", "--max-train-samples", "100")
    args[args.index("--train-file") + 1] = str(tmp_path / "train.jsonl")
    at = args.index("--dev-file")
    assert main(args[:at] + args[at + 2:]) == 0
    with open(tmp_path / "r" / "per_sample.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100
    assert all(json.loads(lines[int(r["row"]) - 1])["text"] == r["text"] for r in rows)
    assert any(int(r["row"]) != int(r["index"]) + 1 for r in rows)


def test_a_failure_inside_the_models_forward_is_one_message(tiny_models, toy_files, tmp_path, monkeypatch, capsys):
    """A model that fails on the batches it gets (Nystromformer at lengths it does not take, memory):
    one 'error:' line naming the model, the batch shape and what to try, not a traceback from inside it."""
    from transformers import BertForSequenceClassification

    def fails(self, *args, **kwargs):
        raise RuntimeError("The size of tensor a (16) must match the size of tensor b (9).")

    monkeypatch.setattr(BertForSequenceClassification, "forward", fails)
    assert main(cli(tiny_models["bert"], toy_files, tmp_path / "o", "--num-epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "failed in its forward on a batch of (16, " in err and "tensor b (9). Some models take only" in err
    assert "Traceback" not in err


def test_a_failure_inside_clear_fast_keeps_its_traceback(tiny_models, toy_files, tmp_path, monkeypatch):
    """Not every error in a forward is the model's: one raised in clear_fast's own code (here the routed
    layer) propagates as it is, a traceback to report, not a message blaming the model's lengths."""
    import types

    import clear_fast.lora as lora_module

    # a torch error raised on a line of the routed layer's own code (a C function has no Python frame)
    import math

    broken_math = {k: getattr(math, k) for k in dir(math) if not k.startswith("_")}
    broken_math["prod"] = torch.zeros(2).view
    monkeypatch.setattr(lora_module, "math", types.SimpleNamespace(**broken_math))
    with pytest.raises(RuntimeError, match="shape .* is invalid for input of size 2"):
        main(cli(tiny_models["bert"], toy_files, tmp_path / "o", "--num-epochs", "1"))
