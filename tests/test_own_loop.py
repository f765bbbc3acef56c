"""CleaR in a training loop of one's own: inject_routed_lora, Router.route, clean_probability, clear_loss
(the README's "In your own training loop")."""
import copy
import warnings

import numpy as np
import pytest
import torch

from clear_fast import Router, clean_probability, clear_loss, inject_routed_lora


@pytest.fixture
def model_and_batch(tiny_models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=4,
                                                               ignore_mismatched_sizes=True)
    tok = AutoTokenizer.from_pretrained(tiny_models["bert"])
    batch = tok(["alpha apple", "bravo banana blue", "charlie", "delta date dune delta"], padding=True,
                return_tensors="pt")
    return model, dict(batch), torch.tensor([0, 1, 2, 3])


def test_bypassed_samples_see_the_frozen_encoder_and_routed_ones_the_adapted(model_and_batch):
    model, batch, labels = model_and_batch
    frozen = copy.deepcopy(model).eval()
    router = inject_routed_lora(model)  # peft's targets for BERT, the released r and alpha
    assert isinstance(router, Router) and router.num_layers == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("classifier.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    router.route(torch.ones(4))  # B starts at zero: one step makes the adapters matter
    loss, per_sample = clear_loss(model(**batch).logits, labels)
    loss.backward()
    opt.step()
    assert per_sample.shape == (4,)

    model.eval()
    hidden = lambda m: m.bert(**batch).last_hidden_state
    with torch.no_grad():
        router.route(None)
        adapted = hidden(model)
        router.route(torch.tensor([1.0, 0.0, 1.0, 0.0]))
        mixed = hidden(model)
        plain = hidden(frozen)
    assert not torch.allclose(adapted, plain, atol=1e-4), "the adapters must have learnt something"
    assert torch.equal(mixed[[1, 3]], plain[[1, 3]]), "bypassed samples: exactly the frozen encoder"
    torch.testing.assert_close(mixed[[0, 2]], adapted[[0, 2]])


def test_route_draws_per_sample_per_layer_masks_and_refuses_what_is_not_probabilities(model_and_batch):
    model, _, _ = model_and_batch
    router = inject_routed_lora(model, r=2)
    masks = router.route(torch.tensor([0.0, 1.0, 0.0]), generator=torch.Generator().manual_seed(0))
    assert masks.tolist() == [[False, False], [True, True], [False, False]]
    assert all(torch.equal(m.routing_mask, torch.tensor([0.0, 1.0, 0.0])) for m in router.modules())
    assert router.route(None) is None and all(m.routing_mask is None for m in router.modules())
    for bad, message in ((torch.ones(2, 3), "1-D"), (torch.ones(3, dtype=torch.long), "floating-point"),
                         ([0.5, 0.5], "list"), (torch.tensor([0.5, 1.5]), r"\[0, 1\]"),
                         (torch.tensor([0.5, float("nan")]), r"\[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            router.route(bad)


def test_the_readme_loop_routes_by_gamma_then_by_gamma_times_clean_probability(model_and_batch):
    model, batch, labels = model_and_batch
    router = inject_routed_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gamma, p_clean, teacher = 0.85, None, None
    generator = torch.Generator().manual_seed(0)
    for epoch in range(3):
        model.train()
        p_route = torch.full((4,), gamma) if p_clean is None else gamma * p_clean
        state = generator.get_state()
        masks = router.route(p_route, generator)
        # the masks are the Bernoulli(p_route) draws: the same uniforms, compared with p_route
        u = torch.rand((4, router.num_layers), generator=torch.Generator().set_state(state))
        assert torch.equal(masks, u < p_route[:, None])
        loss, _ = clear_loss(model(**batch).logits, labels, teacher)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        teacher = torch.zeros(4, 4)
        with torch.no_grad():  # the clean-probability pass: 2 ensemble passes over the training set
            for _ in range(2):
                router.route(torch.full((4,), gamma))
                teacher += model(**batch).logits / 2
        p_clean, _ = clean_probability(torch.nn.functional.cross_entropy(teacher, labels, reduction="none"))
        assert p_clean.shape == (4,) and bool(((p_clean >= 0) & (p_clean <= 1)).all())


def _bert(**overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100, **overrides))


def test_injection_checks_everything_before_changing_the_model():
    model = _bert()
    before = {n: (type(m), tuple(p.requires_grad for p in m.parameters(recurse=False)))
              for n, m in model.named_modules()}
    for bad, message in ((dict(target_modules=["dense"]), "bert.pooler.dense"),  # no layer index
                         (dict(r=0), "rank r"), (dict(target_modules=[]), "module names"),
                         (dict(target_modules="query"), "regular expression the whole dotted name")):
        with pytest.raises(ValueError, match=message):
            inject_routed_lora(model, **bad)
        assert {n: (type(m), tuple(p.requires_grad for p in m.parameters(recurse=False)))
                for n, m in model.named_modules()} == before, f"{bad} changed the model"
    router = inject_routed_lora(model)
    with pytest.raises(ValueError, match="already has 4 routed LoRA layers"):
        inject_routed_lora(model)
    again = Router.from_model(copy.deepcopy(model))
    assert again.module_names == router.module_names and again.layer_paths == router.layer_paths


def test_targets_as_peft_matches_them_and_half_precision_models_get_float32_adapters():
    from transformers import BertConfig, BertModel

    names = lambda router: [n.split("encoder.")[-1] for n in router.module_names]
    assert names(inject_routed_lora(_bert(), target_modules=["attention.self.query"])) == \
        ["layer.0.attention.self.query", "layer.1.attention.self.query"]  # a dotted suffix
    assert names(inject_routed_lora(_bert(), target_modules=r".*layer\.1\..*(key|value)")) == \
        ["layer.1.attention.self.key", "layer.1.attention.self.value"]  # one string: a regex of the name
    backbone = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=100))
    assert inject_routed_lora(backbone).num_layers == 2  # no head: nothing excluded as one
    half = _bert().to(torch.bfloat16)
    router = inject_routed_lora(half)
    layer = router.modules()[0]
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    router.route(torch.tensor([1.0, 0.0]))
    half(input_ids=torch.randint(0, 100, (2, 5))).logits.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_save_adapter_gives_what_trained_classifier_and_peft_load(model_and_batch, tmp_path):
    from clear_fast import TrainedClassifier, save_adapter

    model, batch, labels = model_and_batch
    router = inject_routed_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    router.route(torch.ones(4))
    clear_loss(model(**batch).logits, labels)[0].backward()
    opt.step()
    router.route(None)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits.softmax(-1)
    with pytest.raises(ValueError, match="4 classes, label_names 3"):
        save_adapter(model, router, tmp_path / "x", list("abc"))
    out = save_adapter(model, router, tmp_path / "adapter", list("abcd"), epoch=1)  # base: where it was loaded from
    clf = TrainedClassifier.from_run(out, device="cpu", max_length=16)
    texts = ["alpha apple", "bravo banana blue", "charlie", "delta date dune delta"]
    np.testing.assert_allclose(clf.predict_proba(texts), want.numpy(), atol=1e-5)
    assert clf.label_names == list("abcd") and clf.epoch == 1
    with pytest.raises(ValueError, match=r"give max_length \(--max-length\)"):
        TrainedClassifier.from_run(out, device="cpu")
    # max_length kept in labels.json; a model's own config.json beside it is no run's configuration
    (tmp_path / "config.json").write_text('{"model_type": "bert", "max_length": 20}')
    out = save_adapter(model, router, tmp_path / "adapter", list("abcd"), epoch=1, max_length=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the run has not finished" for a folder that holds no run
        assert TrainedClassifier.from_run(out, device="cpu").max_length == 12


def readme_snippet(heading):
    """The first Python code block after a heading of the README."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme[readme.index(heading):], re.S).group(1)


def test_the_readme_library_snippet_runs_as_written():
    scope = {}
    exec(compile(readme_snippet("## The library"), "README.md", "exec"), scope)
    assert scope["y"].shape == (32, 128, 768) and scope["p_clean"].shape == (10_000,)
    assert scope["loss"].requires_grad and scope["per_sample_ce"].shape == (32,)


def test_the_readme_own_loop_snippet_runs_as_written(model_and_batch):
    """The README's "In your own training loop" code, executed as it stands there."""
    snippet = readme_snippet("### In your own training loop")
    model, batch, labels = model_and_batch
    loader = [(batch, labels, torch.arange(4))]
    scope = {"model": model, "train_loader": loader, "train_labels": labels, "num_labels": 4,
             "num_epochs": 3, "warmup_epochs": 1}
    exec(compile(snippet, "README.md", "exec"), scope)
    p_clean = scope["p_clean"]
    assert p_clean.shape == (4,) and bool(((p_clean >= 0) & (p_clean <= 1)).all())
    assert all(m.routing_mask is None for m in scope["router"].modules()), "ends with every adapter on"


def test_shared_layer_weights_are_warned_of():
    from transformers import AlbertConfig, AlbertForSequenceClassification

    albert = AlbertForSequenceClassification(AlbertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                          intermediate_size=64, embedding_size=16))
    with pytest.warns(UserWarning, match="runs 3 transformer layers but its target modules sit in 1"):
        assert inject_routed_lora(albert).num_layers == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_routed_lora(_bert())  # one routed layer per transformer layer: no warning


def test_merge_and_unload_gives_a_plain_transformers_model(tmp_path):
    """The adapters folded into the weights: no routed layer left, the logits of every adapter on,
    and save_pretrained / from_pretrained in transformers alone give the same model."""
    from transformers import BertConfig, BertForSequenceClassification

    from clear_fast import RoutedLoRALinear, inject_routed_lora, merge_and_unload

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    router = inject_routed_lora(model)
    for layer in router.modules():
        torch.nn.init.normal_(layer.lora_B, std=2.0)
    router.modules()[0].merge()  # an already merged layer is taken as it is
    ids = torch.randint(0, 60, (4, 7))
    router.route(None)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = merge_and_unload(model)
        got = merged(input_ids=ids).logits
    assert not any(isinstance(m, RoutedLoRALinear) for m in merged.modules())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "m")
    again = BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, got, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no RoutedLoRALinear layers"):
        merge_and_unload(merged)
