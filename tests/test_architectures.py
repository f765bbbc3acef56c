"""Routing on encoders whose attention does not call its projections once per batch of samples:
DeBERTa-v2/v3 (share_att_key) also projects the relative-position embeddings, one tensor every sample
shares, through query_proj and key_proj; Longformer calls them on [tokens, batch, features]."""
import copy
import io

import pytest
import torch

from clear_fast import RoutedLoRALinear, inject_routed_lora


def _deberta_v3(buckets=8):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    # deberta-v3-base's attention settings, tiny sizes
    cfg = DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, relative_attention=True, share_att_key=True,
                          pos_att_type=["p2c", "c2p"], position_buckets=buckets, max_relative_positions=64,
                          norm_rel_ebd="layer_norm", num_labels=3)
    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(cfg).eval()


def _live_adapters(model, std=1.0):
    for m in model.modules():
        if isinstance(m, RoutedLoRALinear):
            torch.nn.init.normal_(m.lora_B, std=std)


@pytest.mark.parametrize("batch", [1, 4, 16])  # 16 = 2 x position buckets: the position rows' count
def test_deberta_v3_bypassed_samples_see_the_frozen_model(batch):
    base = _deberta_v3()
    model = copy.deepcopy(base)
    router = inject_routed_lora(model)
    assert {n.split(".")[-1] for n in router.module_names} == {"query_proj", "value_proj"}
    _live_adapters(model)
    ids = torch.randint(5, 100, (batch, 10), generator=torch.Generator().manual_seed(1))
    p = torch.zeros(batch)
    p[1::2] = 1
    router.route(p)
    with torch.no_grad():
        out, frozen = model(input_ids=ids).logits, base(input_ids=ids).logits
    bypassed = p == 0
    assert torch.equal(out[bypassed], frozen[bypassed])
    if batch > 1:
        assert (out[~bypassed] - frozen[~bypassed]).abs().amax(1).min() > 1e-6  # the routed ones are adapted
    assert not any(m.shared_input for m in router.modules())  # the flag lives only inside the attention


def test_deberta_v3_a_samples_logits_do_not_depend_on_its_batch():
    """The position projections are frozen for every sample, routed or not, in any batch (and also
    with every adapter on: the model is evaluated as it was trained)."""
    model = _deberta_v3()
    router = inject_routed_lora(model)
    _live_adapters(model)
    ids = torch.randint(5, 100, (4, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        router.route(torch.ones(1))
        alone = model(input_ids=ids[:1]).logits
        router.route(torch.ones(4))
        batched = model(input_ids=ids).logits[:1]
        router.route(None)
        unrouted = model(input_ids=ids).logits[:1]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-6)
    torch.testing.assert_close(unrouted, batched, rtol=0, atol=1e-6)


def test_deberta_v3_adapters_get_no_gradient_from_bypassed_samples():
    model = _deberta_v3()
    router = inject_routed_lora(model)
    _live_adapters(model)
    ids = torch.randint(5, 100, (4, 10), generator=torch.Generator().manual_seed(3))
    router.route(torch.zeros(4))
    model(input_ids=ids).logits.sum().backward()
    grads = [m.lora_A.grad for m in router.modules()] + [m.lora_B.grad for m in router.modules()]
    assert all(g is None or not g.any() for g in grads)


def test_deberta_v3_hooks_survive_copies_and_pickling():
    base = _deberta_v3()
    model = copy.deepcopy(base)
    inject_routed_lora(model)
    _live_adapters(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        from clear_fast import Router

        router = Router.from_model(twin)
        ids = torch.randint(5, 100, (16, 10), generator=torch.Generator().manual_seed(4))
        router.route(torch.zeros(16))
        with torch.no_grad():
            assert torch.equal(twin(input_ids=ids).logits, base(input_ids=ids).logits)


def test_deberta_v3_merged_layers_keep_the_position_projections_frozen():
    model = _deberta_v3()
    router = inject_routed_lora(model)
    _live_adapters(model)
    ids = torch.randint(5, 100, (3, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        for m in router.modules():
            m.merge()
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)


def test_routing_masks_of_another_batch_name_the_fix():
    """Masks routed for one batch and a forward of another size (e.g. evaluation after training
    without router.route(None)): an error that says what to do, not a shape error deep inside."""
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32))
    router = inject_routed_lora(model)
    router.route(torch.ones(3))
    with pytest.raises(ValueError, match=r"hold 3 samples.*has 4.*router\.route\(None\)"):
        model(input_ids=torch.randint(0, 50, (4, 6)))
    # the same count of rows per sample is not mistaken for a per-row mask: 3 samples x 1 token
    router.route(torch.ones(3))
    with pytest.raises(ValueError, match="hold 3 samples"):
        model(input_ids=torch.randint(0, 50, (1, 3)))


def test_longformer_attention_is_refused_by_name():
    from transformers import LongformerConfig, LongformerForSequenceClassification

    model = LongformerForSequenceClassification(LongformerConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attention_window=4, max_position_embeddings=40, pad_token_id=1))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"LongformerSelfAttention.*\[tokens, batch, features\]"):
        inject_routed_lora(model)
    assert not any(isinstance(m, RoutedLoRALinear) for m in model.modules())  # unchanged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    router = inject_routed_lora(model, ["intermediate.dense"])  # batch-first modules are fine
    assert router.num_layers == 2


def test_second_derivatives_raise_instead_of_dropping_terms():
    layer = RoutedLoRALinear(6, 5, r=2)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6, requires_grad=True)
    (gA,) = torch.autograd.grad(layer(x).square().sum(), layer.lora_A, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gA.square().sum().backward()  # a gradient penalty, as in MAML-style training


def test_gpt2_conv1d_projections_are_named_as_unsupported():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2,
                                                     bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="Conv1D layers, as GPT-2's are: not supported"):
        inject_routed_lora(model)


def test_target_modules_that_are_not_names_are_refused_by_name():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32))
    for bad in (3, ["query", 3], []):
        with pytest.raises(ValueError, match="target_modules must be module names"):
            inject_routed_lora(model, bad)


def test_deberta_v3_saved_adapter_reloads_as_the_trained_model(tmp_path):
    """from_run loads the adapter with peft, whose LoRA would adapt the position projections too:
    the same hooks keep them frozen there, so the reloaded classifier predicts what the run's model
    does (every adapter on)."""
    from transformers import AutoTokenizer

    from clear_fast import TrainedClassifier, save_adapter
    from clear_fast.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    cfg = DebertaV2Config(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, relative_attention=True, share_att_key=True,
                          pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=64,
                          norm_rel_ebd="layer_norm", num_labels=3, type_vocab_size=0)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = DebertaV2ForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    router = inject_routed_lora(model)
    _live_adapters(model, std=30.0)
    torch.nn.init.normal_(model.classifier.weight, std=5.0)  # probabilities away from 1/3, which hide differences
    save_adapter(model, router, tmp_path / "run", ["a", "b", "c"], max_length=16)
    texts = ["the first text", "another one here", "a third and longer text to classify"]
    clf = TrainedClassifier.from_run(tmp_path / "run", device="cpu")
    batch = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    router.route(None)
    with torch.no_grad():
        expected = torch.softmax(model(**batch).logits, -1).numpy()
    got = clf.predict_proba(texts)
    assert abs(expected - 1 / 3).max() > 1e-2
    assert abs(got - expected).max() < 1e-6


def test_deberta_v3_merge_and_unload_is_refused():
    from clear_fast import merge_and_unload

    model = _deberta_v3()
    inject_routed_lora(model)
    with pytest.raises(ValueError, match="relative-position embeddings"):
        merge_and_unload(model)


def _bypass_is_exact(model, router, ids, **kw):
    """Routed samples 1 and 3 off: those rows equal the frozen model's (adapters forced live)."""
    frozen = copy.deepcopy(model)
    for m in frozen.modules():
        if isinstance(m, RoutedLoRALinear):
            torch.nn.init.zeros_(m.lora_B)
    _live_adapters(model)
    p = torch.tensor([1.0, 0.0, 1.0, 0.0])
    router.route(p)
    Router = type(router)
    Router.from_model(frozen).route(p)
    with torch.no_grad():
        out, ref = model(input_ids=ids, **kw).logits, frozen(input_ids=ids, **kw).logits
    assert torch.equal(out[p == 0], ref[p == 0])
    assert (out[p == 1] - ref[p == 1]).abs().amax(1).min() > 1e-6


def test_encoder_decoder_layers_get_their_own_masks():
    """T5's encoder.block.i and decoder.block.i were one mask column (both index i): now one each."""
    from transformers import T5Config, T5ForSequenceClassification

    torch.manual_seed(0)
    model = T5ForSequenceClassification(T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                 num_decoder_layers=2, num_heads=2, num_labels=3,
                                                 decoder_start_token_id=0, pad_token_id=0)).eval()
    router = inject_routed_lora(model)
    assert router.num_layers == 4
    for modules, stack in zip(router.layers, ("encoder", "encoder", "decoder", "decoder")):
        names = [n for n, m in model.named_modules() if any(m is x for x in modules)]
        assert all(f".{stack}." in "." + n for n in names), names
    ids = torch.randint(2, 60, (4, 6), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = model.config.eos_token_id  # its classifier reads the <eos> position
    _bypass_is_exact(model, router, ids)


@pytest.mark.parametrize("arch", ["mpnet", "modernbert"])
def test_default_targets_where_peft_has_none(arch):
    import transformers

    small = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 num_labels=3)
    if arch == "mpnet":
        model, targets = transformers.MPNetForSequenceClassification(transformers.MPNetConfig(**small)), {"q", "v"}
    else:
        model, targets = (transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(
            **small, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)), {"Wqkv"})
    model.eval()
    router = inject_routed_lora(model)
    assert {n.split(".")[-1] for n in router.module_names} == targets
    assert router.num_layers == 2
    _bypass_is_exact(model, router, torch.randint(3, 60, (4, 6), generator=torch.Generator().manual_seed(2)))


def test_xlnet_sequence_first_layers_are_refused_by_name():
    from transformers import XLNetConfig, XLNetForSequenceClassification

    model = XLNetForSequenceClassification(XLNetConfig(vocab_size=60, d_model=16, n_layer=2, n_head=2, d_inner=32))
    with pytest.raises(ValueError, match=r"XLNetFeedForward calls it on \[tokens, batch, features\]"):
        inject_routed_lora(model, ["layer_1"])


def test_load_classifier_names_a_tokenizer_that_is_not_the_models_and_fills_in_its_pad_id(tmp_path):
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig,
                              LlamaForSequenceClassification)

    from clear_fast.model import load_classifier, resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    small = BertConfig(vocab_size=1000, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForSequenceClassification(small).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"tokenizer has 30522 tokens but the model embeds 1000"):
        load_classifier(str(tmp_path / "bert"), 3)
    # a decoder-style classifier without a pad id (Llama's) finds each text's last token by it
    LlamaForSequenceClassification(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               pad_token_id=None)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    model, _, _ = load_classifier(str(tmp_path / "llama"), 3)
    assert model.config.pad_token_id == tok.pad_token_id


def test_a_target_outside_the_layers_is_named_with_a_way_round():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match=r"'bert.pooler.dense' belongs to.*such as a pooler"):
        inject_routed_lora(model, ["dense"])
    router = inject_routed_lora(model, r".*layer\.\d+\..*dense")  # the way round it names
    assert router.num_layers == 2 and len(router.modules()) == 6


def test_xlm_parallel_lists_route_each_layer_with_one_mask():
    """XLM keeps a layer's attention and feed-forward in two lists (attentions.i, ffns.i): targeting
    both gives one mask column per layer, not one per list."""
    from transformers import XLMConfig, XLMForSequenceClassification

    model = XLMForSequenceClassification(XLMConfig(vocab_size=60, emb_dim=16, n_layers=2, n_heads=2, num_labels=3))
    router = inject_routed_lora(model, ["q_lin", "v_lin", "lin1"])
    assert router.num_layers == 2 and [len(m) for m in router.layers] == [3, 3]
    assert router.layer_paths is None  # no one list of layers: the ensemble passes run one after another
    assert inject_routed_lora(XLMForSequenceClassification(XLMConfig(vocab_size=60, emb_dim=16, n_layers=2, n_heads=2))
                              ).num_layers == 2  # the defaults, q_lin and v_lin


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (the routed layer's Triton kernels)")
def test_cuda_deberta_v3_bypassed_samples_see_the_frozen_model():
    base = _deberta_v3().cuda()
    model = copy.deepcopy(base)
    router = inject_routed_lora(model)
    _live_adapters(model)
    ids = torch.randint(5, 100, (16, 10), generator=torch.Generator().manual_seed(1)).cuda()
    p = torch.zeros(16, device="cuda")
    p[1::2] = 1
    router.route(p)
    with torch.no_grad():
        out, frozen = model(input_ids=ids).logits, base(input_ids=ids).logits
    assert torch.equal(out[p == 0], frozen[p == 0])
    assert (out[p == 1] - frozen[p == 1]).abs().amax(1).min() > 1e-6
