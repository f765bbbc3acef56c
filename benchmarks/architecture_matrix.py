"""Does the CLI work on this Hugging Face architecture? Tiny random models of many encoder (and a few
other) classes through `python -m clear_fast.train` and `python -m clear_fast.predict`, on the CPU.

    python benchmarks/architecture_matrix.py                      # every architecture, clear-lora
    python benchmarks/architecture_matrix.py --archs bert t5 --methods clear-lora lora full

Each model: 2 layers, width 32, random weights, saved with the offline MiniLM tokenizer; data: a 3-class
keyword task, 60 training and 20 test rows (labels as given); a run: 2 epochs (1 warm-up), batch 16,
length 32. Per run: the exit status (and the error line when it fails; "TRACEBACK" when it was not one
line), for LoRA runs the adapted modules, how many lora_B are non-zero after training and the routed
fraction of each epoch, and whether predict reloads the run (its accuracy on the test file equals the
run's last accuracy). Writes benchmarks/results/architectures_cpu.{json,md}. About 10 s a run.
"""
import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

W, CFG = 32, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=130, pad_token_id=0)
SPECIAL = dict(bos_token_id=101, eos_token_id=102)
# name: (config class, model class, config arguments besides vocab_size and num_labels)
ARCHS = {
    "bert": ("BertConfig", "BertForSequenceClassification", CFG),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(dim=W, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=130, pad_token_id=0)),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", dict(CFG, **SPECIAL)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", dict(CFG, **SPECIAL)),
    "camembert": ("CamembertConfig", "CamembertForSequenceClassification", dict(CFG, **SPECIAL)),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", dict(CFG, embedding_size=16, **SPECIAL)),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", dict(CFG, embedding_size=16)),
    "deberta": ("DebertaConfig", "DebertaForSequenceClassification", CFG),
    "deberta-v3": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   dict(CFG, relative_attention=True, share_att_key=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
                        max_relative_positions=-1, position_biased_input=False, norm_rel_ebd="layer_norm", type_vocab_size=0)),
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification", dict(CFG, **SPECIAL)),
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification",
                   dict(CFG, cls_token_id=101, sep_token_id=102, global_attn_every_n_layers=1, local_attention=32, **SPECIAL)),
    "eurobert": ("EuroBertConfig", "EuroBertForSequenceClassification",
                 dict(CFG, num_key_value_heads=2, mask_token_id=103, **SPECIAL)),
    "funnel": ("FunnelConfig", "FunnelForSequenceClassification",
               dict(block_sizes=[1, 1], d_model=W, n_head=2, d_head=16, d_inner=64, num_decoder_layers=1, pad_token_id=0)),
    "big_bird": ("BigBirdConfig", "BigBirdForSequenceClassification",
                 dict(CFG, attention_type="original_full", sep_token_id=102, **SPECIAL)),
    "convbert": ("ConvBertConfig", "ConvBertForSequenceClassification", dict(CFG, embedding_size=W)),
    "roformer": ("RoFormerConfig", "RoFormerForSequenceClassification", dict(CFG, embedding_size=W)),
    "mobilebert": ("MobileBertConfig", "MobileBertForSequenceClassification",
                   dict(CFG, embedding_size=W, intra_bottleneck_size=W, true_hidden_size=W, num_feedforward_networks=1)),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextForSequenceClassification", dict(CFG, **SPECIAL)),
    "megatron-bert": ("MegatronBertConfig", "MegatronBertForSequenceClassification", CFG),
    "ernie": ("ErnieConfig", "ErnieForSequenceClassification", CFG),
    "rembert": ("RemBertConfig", "RemBertForSequenceClassification",
                dict(CFG, input_embedding_size=16, output_embedding_size=16)),
    "xlm": ("XLMConfig", "XLMForSequenceClassification",
            dict(emb_dim=W, n_layers=2, n_heads=2, max_position_embeddings=130, pad_index=0, pad_token_id=0)),
    "esm": ("EsmConfig", "EsmForSequenceClassification", dict(CFG, mask_token_id=103, position_embedding_type="absolute")),
    "layoutlm": ("LayoutLMConfig", "LayoutLMForSequenceClassification", CFG),
    "yoso": ("YosoConfig", "YosoForSequenceClassification", CFG),
    # not encoders, or not routable: what a user who tries them sees
    "longformer": ("LongformerConfig", "LongformerForSequenceClassification",
                   dict(CFG, attention_window=[8, 8], max_position_embeddings=514, **SPECIAL)),
    "xlnet": ("XLNetConfig", "XLNetForSequenceClassification",
              dict(d_model=W, n_layer=2, n_head=2, d_inner=64, pad_token_id=0, **SPECIAL)),
    "squeezebert": ("SqueezeBertConfig", "SqueezeBertForSequenceClassification", dict(CFG, embedding_size=W)),
    "fnet": ("FNetConfig", "FNetForSequenceClassification", CFG),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification",
             dict(n_embd=W, n_layer=2, n_head=2, n_positions=130, pad_token_id=0, **SPECIAL)),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", dict(CFG, num_key_value_heads=2, **SPECIAL)),
    "t5": ("T5Config", "T5ForSequenceClassification",
           dict(d_model=W, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0, eos_token_id=102,
                decoder_start_token_id=0)),
    "bart": ("BartConfig", "BartForSequenceClassification",
             dict(d_model=W, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=130, pad_token_id=0,
                  decoder_start_token_id=102, **SPECIAL)),
}
WORDS = {"sports": "ball goal team match score player coach league".split(),
         "food": "pizza bread cheese soup salad apple dinner cook".split(),
         "tech": "computer software phone network code chip data server".split()}


def write_data(folder):
    rng = random.Random(0)
    for name, n in (("train.csv", 60), ("test.csv", 20)):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                label = list(WORDS)[i % 3]
                words = rng.sample(WORDS[label], 4) + rng.sample("the a is very good today my".split(), 3)
                rng.shuffle(words)
                w.writerow([" ".join(words), label])


def build(name, folder, tokenizer):
    import torch
    import transformers

    config_class, model_class, kwargs = ARCHS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=len(tokenizer), num_labels=3, **kwargs)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return ("TRACEBACK " if "Traceback" in text else "") + (lines[-1][:200] if lines else "")


def one_run(name, method, model_dir, data, out):
    """The record of one training run and its predict call."""
    from safetensors.torch import load_file

    run = out / f"{name}-{method}"
    cmd = [sys.executable, "-m", "clear_fast.train", "--model", str(model_dir), "--train-file", str(data / "train.csv"),
           "--test-file", str(data / "test.csv"), "--method", method, "--num-epochs", "2", "--warmup-epochs", "1",
           "--batch-size", "16", "--max-length", "32", "--no-progress", "--no-plots", "--output-dir", str(run)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    rec = {"arch": name, "method": method, "rc": p.returncode}
    if p.returncode != 0:
        rec["error"] = last_line(p.stdout + p.stderr)
        return rec
    rec["last_accuracy"] = json.loads((run / "results.json").read_text())["last_test_accuracy"]
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rec["routed"] = [m.get("routed_fraction") for m in metrics]
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        w = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        rec["adapted"] = sorted({re.sub(r".*\.", "", k.split(".lora_A")[0]) for k in w if ".lora_A" in k})
        b = [k for k in w if ".lora_B" in k]
        rec["lora_B_nonzero"] = f"{sum(bool(w[k].abs().sum() > 0) for k in b)}/{len(b)}"
    pred = subprocess.run([sys.executable, "-m", "clear_fast.predict", str(run), str(data / "test.csv"),
                           "--output", str(out / f"{name}-{method}.csv")], capture_output=True, text=True, timeout=300)
    m = re.search(r"accuracy ([0-9.]+)", pred.stdout + pred.stderr)
    rec["predict_reloads"] = pred.returncode == 0 and m is not None and abs(float(m.group(1)) - rec["last_accuracy"]) < 1e-9
    if pred.returncode != 0:
        rec["predict_error"] = last_line(pred.stdout + pred.stderr)
    return rec


def markdown(records, command, machine):
    lines = ["# The CLI on tiny random models of Hugging Face architectures (CPU)", "", f"`{command}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
             "Method: see the docstring of benchmarks/architecture_matrix.py.", "",
             "| architecture | method | exit | adapted | lora_B non-zero | routed by epoch | predict reloads | error |",
             "|---|---|---:|---|---|---|---|---|"]
    for r in records:
        routed = ", ".join("-" if f is None else f"{f:.2f}" for f in r.get("routed", []))
        lines.append(f"| {r['arch']} | {r['method']} | {r['rc']} | {' '.join(r.get('adapted', []))} | "
                     f"{r.get('lora_B_nonzero', '')} | {routed} | {r.get('predict_reloads', '')} | "
                     f"{(r.get('error') or r.get('predict_error') or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--methods", nargs="+", default=["clear-lora"], choices=["clear-lora", "lora", "full"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from clear_fast.io import write_json, write_text
    from clear_fast.model import resolve_model_path
    from epoch_table import _commit
    from mixture_table import machine

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp)
        for name in args.archs:
            try:
                build(name, tmp / "models" / name, tokenizer)
            except Exception as e:  # noqa: BLE001 - a model this transformers cannot build is a row too
                records.append({"arch": name, "method": "-", "rc": "-", "error": f"build: {type(e).__name__}: {e}"[:200]})
                continue
            for method in args.methods:
                records.append(one_run(name, method, tmp / "models" / name, tmp, tmp / "runs"))
                print(json.dumps(records[-1]), flush=True)
    info = {**machine(), "commit": _commit()}
    command = "python benchmarks/architecture_matrix.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stem = os.path.join(args.out, "architectures_cpu")
    write_json(stem + ".json", {"machine": info, "records": records})
    write_text(stem + ".md", markdown(records, command.strip(), info))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
