"""The CleaR training loop (clear-method.md), with plain LoRA, full fine-tuning and oracle routing.

One epoch: training steps (routed after warm-up, with the consistency loss towards the teacher),
evaluation, then the clean-probability pass whose clean probabilities and ensemble logits drive the
next epoch (it runs after the last update of an epoch, which is the same as "before the first update
of the next"). Every epoch ends with an atomic checkpoint, so --resume continues to the same result.
"""
import contextlib
import csv
import hashlib
import io as _io
import json
import platform
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import io, metrics, plots
from .config import GIVE_A_DEV_SPLIT, ROUTED_METHODS, TrainConfig, UserError
from .losses import clear_loss
from .mixture import clean_probability
from .model import (HeadShield, draw_routing_masks, inject_routed_lora, load_classifier, quiet_transformers,
                    save_peft_adapter, sentence_embeddings, shared_prefix_passes, usable_max_length,
                    without_cudnn_attention, write_labels_json)

# Everything a run writes into --output-dir (README, "Outputs"): what --overwrite removes. Other
# files a user keeps there are never touched.
OUTPUT_FILES = ("config.json", "noise.json", "metrics.jsonl", "results.json", "per_sample.csv", "checkpoint.pt")
OUTPUT_DIRS = ("plots", "adapter", "model")
# Settings that may differ on --resume: they change no result (output_dir: the folder given is the run).
RESUME_FREE = {"resume", "overwrite", "progress", "plots", "shared_prefix_pass", "save_adapter", "output_dir"}


def _raised_in_clear_fast(error):
    """Whether the innermost Python frame of the error's traceback is clear_fast's (or its kernels')."""
    from . import kernels

    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve()
    ours = [Path(__file__).resolve().parent, *(Path(p).resolve() for p in kernels.__path__)]
    return any(where.is_relative_to(d) for d in ours)


class TrainingDiverged(UserError):
    """The per-sample losses went NaN or infinite: a setting to change, not a bug to report."""


# ----------------------------------------------------------------------------- data to tensors
class Tokenized:
    """Token ids of one split, tokenised once and kept as one flat array (no Python list per text);
    batches are padded to their own longest text."""

    def __init__(self, ids, labels, pad_id=0, pad_to_multiple_of=1, max_width=None):
        """pad_to_multiple_of: batches are padded up to a multiple of it, but not beyond max_width
        (or their longest text, if longer)."""
        ids = [np.asarray(x, dtype=np.int64).reshape(-1) for x in ids]
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.pad_id, self.multiple, self.max_width = pad_id, pad_to_multiple_of, max_width

    @classmethod
    def from_texts(cls, tokenizer, texts, labels, max_length, pad_to_multiple_of=1):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(enc["input_ids"], labels, pad, pad_to_multiple_of, max_length)

    def __len__(self):
        return len(self.lengths)

    def batch(self, index, device):
        """input_ids and attention_mask [n, longest], labels [n] and the samples' index [n], all on
        `device`. Built with a few vectorised numpy operations and sent in one copy: a training
        step on a GPU is host-bound, and a loop over the texts cost ~0.7 ms per batch of 32 on this
        project's CPU, where this takes 0.04 ms (measured)."""
        index = np.asarray(index, dtype=np.int64)
        n, lengths = len(index), self.lengths[index]
        width = int(lengths.max())
        if self.multiple > 1:
            padded = -(-width // self.multiple) * self.multiple
            width = max(width, padded if self.max_width is None else min(padded, self.max_width))
        cols = np.arange(width)
        real = cols[None, :] < lengths[:, None]
        at = np.minimum(self.offsets[index][:, None] + cols[None, :], max(len(self.tokens) - 1, 0))
        nw = n * width
        buf = np.empty(2 * nw + 2 * n, dtype=np.int64)
        buf[:nw] = np.where(real, self.tokens[at], self.pad_id).ravel()
        buf[nw: 2 * nw] = real.ravel()
        buf[2 * nw: 2 * nw + n] = self.labels.numpy()[index]
        buf[2 * nw + n:] = index
        buf = torch.from_numpy(buf).to(device)
        return {"input_ids": buf[:nw].view(n, width), "attention_mask": buf[nw: 2 * nw].view(n, width),
                "labels": buf[2 * nw: 2 * nw + n], "index": buf[2 * nw + n:]}

    def sorted_batches(self, batch_size, device):
        """No-grad passes go in length order: little padding wasted."""
        order = np.argsort(self.lengths, kind="stable")
        for s in range(0, len(order), batch_size):
            yield self.batch(order[s: s + batch_size], device)


# ----------------------------------------------------------------------------- the run
class Run:
    def __init__(self, config: TrainConfig):
        self.cfg = config.fill_defaults()  # for a config made without validate()
        self.out = Path(config.output_dir)
        self.device = _pick_device(config.device)
        self.routed = config.method in ROUTED_METHODS
        self.wrote = False  # whether this run has changed anything in its output folder
        self.checkpoint_epoch = None  # the last epoch checkpointed in it (by this run or the resumed one)

    # -- set-up ---------------------------------------------------------------------------
    def outputs_present(self):
        return [f for f in OUTPUT_FILES if (self.out / f).exists()] + \
               [d + "/" for d in OUTPUT_DIRS if (self.out / d).exists()]

    def check_output_dir(self):
        """Refuse a start that would mix two runs or resume the wrong one. Reads only: nothing in
        the folder changes before the data and model have loaded (a failed start leaves it as it was)."""
        cfg, out = self.cfg, self.out
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "" if existing == out else f": {existing}"
            raise UserError(f"--output-dir {out}{where} is a file, not a folder; choose another --output-dir")
        found = self.outputs_present()
        has_checkpoint = (out / "checkpoint.pt").exists()
        # config.json is written once the run has loaded; a checkpoint only after its first epoch
        never_checkpointed = "config.json" in found and not has_checkpoint and "results.json" not in found
        if cfg.resume:
            if never_checkpointed:
                raise UserError(f"--resume: {out} holds no checkpoint to resume from (its run stopped before "
                                "finishing its first epoch); start it again with --overwrite instead of --resume")
            if not has_checkpoint:
                raise UserError(f"--resume: no checkpoint in {out} to resume from"
                                + ("" if found else " (no run there); leave out --resume to start a new run"))
            if not (out / "config.json").exists():
                raise UserError(f"--resume: {out} has checkpoint.pt but no config.json, so its settings are "
                                "unknown; start again with --overwrite")
            saved = TrainConfig.saved_with_defaults(json.loads((out / "config.json").read_text()))
            for name in cfg.defaulted:  # a setting not given now: the run's own
                setattr(cfg, name, saved[name])
            now = cfg.to_dict()
            diff = sorted(k for k, v in now.items() if k not in RESUME_FREE and saved.get(k) != v)
            if diff:
                raise UserError(f"--resume: the run in {out} was made with different settings: "
                                + ", ".join(f"{k} (saved {saved.get(k)!r}, now {now[k]!r})" for k in diff))
        elif never_checkpointed and not cfg.overwrite:
            raise UserError(f"{out} holds an unfinished run that never checkpointed (it stopped before finishing "
                            "its first epoch, so --resume cannot continue it): pass --overwrite to start it "
                            "again, or choose another --output-dir")
        elif found and not cfg.overwrite:
            raise UserError(f"{out} already holds a run ({', '.join(found)}): pass --resume to "
                            f"continue it, --overwrite to replace it, or choose another --output-dir")

    def prepare_output_dir(self):
        """Once the run has loaded: with --overwrite the old run's outputs go, then this run's
        configuration and noise are written."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --output-dir {self.out}: {e.strerror or e}") from None
        self.wrote = True
        if self.cfg.overwrite:
            self.remove_outputs()
        io.write_json(self.out / "config.json", self.cfg.to_dict())
        io.write_json(self.out / "noise.json", {**self.noise_info, "clean_mask": self.clean_mask.astype(int).tolist()})

    def remove_outputs(self):
        """Every output of an earlier run here, with the temporary files an interrupted write leaves
        (io's .NAME.*.tmp, save_model's .model.* and NAME.old folders); nothing else."""
        for name in OUTPUT_FILES:
            (self.out / name).unlink(missing_ok=True)
            for tmp in self.out.glob(f".{name}.*.tmp"):
                tmp.unlink()
        folders = [self.out / d for d in OUTPUT_DIRS] + [self.out / f"{d}.old" for d in OUTPUT_DIRS]
        for folder in folders + list(self.out.glob(".model.*")):
            if folder.is_dir():
                shutil.rmtree(folder)

    def interrupted_advice(self):
        """What to do after Ctrl-C, from what this run has left on disk."""
        cfg, out = self.cfg, self.out
        if self.checkpoint_epoch is not None:
            how = "the same command" + (" without --overwrite" if cfg.overwrite else "") + \
                  ("" if cfg.resume else " plus --resume")
            return (f"epoch {self.checkpoint_epoch + 1} of {cfg.num_epochs} is checkpointed in {out}; "
                    f"continue with {how}")
        if not self.wrote:
            return f"nothing was written to {out}; run the same command again"
        return (f"no epoch finished, so {out} holds no checkpoint to resume from; start again with the same "
                "command" + ("" if cfg.overwrite else " plus --overwrite"))

    def load(self):
        from .data import hold_out, load_dataset, stratified_subset
        from .noise import inject_noise

        cfg = self.cfg
        data = load_dataset(None if cfg.train_file else cfg.dataset, train_file=cfg.train_file,
                            test_file=cfg.test_file, dev_file=cfg.dev_file, text_column=cfg.text_column,
                            label_column=cfg.label_column)
        if data.num_classes < 2:
            raise ValueError(f"the training data has {data.num_classes} class(es): at least two are needed")
        subset = lambda split, n: stratified_subset(split, n or None, cfg.data_seed) if split else None
        self.data_name = data.name
        self.data_notes = list(data.notes)
        if cfg.dev_fraction:
            if data.dev is not None:
                raise UserError(f"{data.name} has a dev split ({len(data.dev)} samples): --dev-fraction is for "
                                "data without one")
            try:
                data.train, data.dev = hold_out(data.train, cfg.dev_fraction, cfg.data_seed)
            except ValueError as e:
                raise UserError(f"--dev-fraction {cfg.dev_fraction:g}: {e}") from None
            self.data_notes.append(f"dev: {len(data.dev)} samples held out of the training set (--dev-fraction "
                                   f"{cfg.dev_fraction:g}, stratified), labels as given")
        self.label_names = list(data.label_names)
        self.train_split = subset(data.train, cfg.max_train_samples)
        missing = data.num_classes - len(np.unique(self.train_split.labels))
        if missing:
            warnings.warn(f"the training set ({len(self.train_split)} samples) holds no sample of {missing} of the "
                          f"{data.num_classes} classes: raise --max-train-samples to at least {data.num_classes}",
                          UserWarning, stacklevel=2)
        dev_split, test_split = subset(data.dev, cfg.max_eval_samples), subset(data.test, cfg.max_eval_samples)
        self.data_fingerprint = {name: _fingerprint(split, self.label_names) for name, split in
                                 (("training", self.train_split), ("dev", dev_split), ("test", test_split))}

        self.model, tokenizer, self.model_path = load_classifier(cfg.model, data.num_classes, self.label_names)
        self.tokenizer = tokenizer  # saved beside a fully fine-tuned model
        self.model.to(self.device)
        self.max_length = max_length = usable_max_length(cfg.max_length, self.model, tokenizer)
        tok = lambda s: (Tokenized.from_texts(tokenizer, s.texts, s.labels, max_length, cfg.pad_to_multiple_of)
                         if s is not None else None)
        self.train, self.dev, self.test = tok(self.train_split), tok(dev_split), tok(test_split)
        if cfg.keep_model == "best-dev" and self.dev is None:
            raise UserError(f"--keep-model best-dev needs a dev split: {self.data_name} has none ({GIVE_A_DEV_SPLIT})")
        self.true_labels = self.train.labels.clone()

        features = None
        if cfg.noise_type == "instance":
            self.model.eval()
            with float32_matmul_precision("highest"):  # the noise drawn does not depend on --tf32
                emb = sentence_embeddings(self.model, self.train.sorted_batches(cfg.eval_batch_size, self.device))
            features = np.empty((len(self.train), emb.shape[1]), dtype=np.float32)
            features[np.argsort(self.train.lengths, kind="stable")] = emb.numpy()
        noise = inject_noise(self.true_labels.numpy(), data.num_classes, cfg.noise_type, cfg.noise_rate,
                             cfg.effective_noise_seed, features=features)
        self.noise_info = dict(noise.info)
        self.clean_mask = np.asarray(noise.clean_mask, dtype=bool)
        self.train.labels = torch.as_tensor(noise.noisy_labels, dtype=torch.long)
        print(self._data_line(len(data.train)))

        if cfg.method == "full":
            self.router = None
            for p in self.model.parameters():
                p.requires_grad_(True)
        else:
            self.router = inject_routed_lora(self.model, cfg.target_modules, cfg.r, cfg.lora_alpha,
                                             cfg.lora_dropout)
            self.model.to(self.device)
        self.attach_model(self.model, self.router)
        print(self._model_line())

    def _model_line(self):
        """What the run trains, said once after the data line (peft's print_trainable_parameters, and
        where the adapters went: a model type without known targets falls back to query/value)."""
        # parameters() counts a shared parameter once; self.trainable is attach_model's list
        total, trained = sum(p.numel() for p in self.model.parameters()), sum(p.numel() for p in self.trainable)
        what = f"{self.cfg.model} ({getattr(self.model.config, 'model_type', '?')})"
        if self.router is None:
            return f"model: {what}, full fine-tuning: {trained:,} parameters trained"
        targets = sorted({n.rpartition(".")[2] for n in self.router.module_names})
        return (f"model: {what}, LoRA r {self.cfg.r} on {', '.join(targets)} in {self.router.num_layers} layers "
                f"({len(self.router.module_names)} modules): {trained:,} of {total:,} parameters trained "
                f"({100 * trained / total:.2f} %: the adapters and the head)")

    def _data_line(self, available):
        """What the run trains on, said once at its start: the subset and the noise are the two
        settings whose defaults differ between built-in datasets and the user's own data."""
        cfg, n = self.cfg, len(self.train)
        subset = f" of {available} (a stratified subset: --max-train-samples 0 for all)" if n < available else ""
        if cfg.injects_noise:
            noise = f"{cfg.noise_type} noise {cfg.noise_rate:g} injected: {int((~self.clean_mask).sum())} labels flipped"
        else:
            noise = "labels as given (no noise injected)"
        sizes = ", ".join(f"{name} {len(s)}" for name, s in (("dev", self.dev), ("test", self.test)) if s is not None)
        return f"{self.data_name}: {len(self.label_names)} classes, training on {n}{subset}, {sizes}; {noise}"

    def attach_model(self, model, router):
        """Train this model (its LoRA layers driven by router; None for full fine-tuning): the head
        shield, optimizer and compiled forward. Run.load ends here; benchmarks enter here with a
        model and splits of their own."""
        cfg = self.cfg
        self.model, self.router = model, router
        for module in router.modules() if router is not None else ():
            module.cache_frozen_cast = True  # the run owns the model: nothing edits its frozen weights
        self.head_shield = HeadShield(model) if cfg.head_routing == "routed" and self.routed else None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # On CUDA the fused AdamW: one launch per step for all parameters (foreach takes about 8,
        # which count in a host-bound step). The CPU keeps the default, as the committed runs used.
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.forward_model = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
        if router is not None:
            router.static_masks = cfg.compile  # CUDA graphs keep the masks' addresses (Router's docstring)
        # The shared-prefix pass swaps layers per batch, which a compiled model would recompile for.
        self._share_prefix = (cfg.shared_prefix_pass and not cfg.compile and router is not None
                              and router.layer_paths is not None)
        self._share_prefix_checked = False

    # -- pieces of an epoch -----------------------------------------------------------------
    def _route(self, p_batch):
        """Set each layer's routing mask for this batch from per-sample routing probabilities
        p_batch [B] (None: every sample through every adapter). Drawn on the device: no sync."""
        if self.router is None:
            return None
        masks = None if p_batch is None else draw_routing_masks(p_batch, self.router.num_layers)
        self.router.set_masks(masks)
        return masks

    def _logits(self, batch):
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                out = self.forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        except (RuntimeError, IndexError) as e:
            if _raised_in_clear_fast(e) and not isinstance(e, torch.OutOfMemoryError):
                raise  # ours: a traceback, not a message blaming the model
            # from deep inside the model (its own limits, memory)
            raise UserError(f"the model ({self.cfg.model}) failed in its forward on a batch of "
                            f"{tuple(batch['input_ids'].shape)} tokens: {type(e).__name__}: {str(e).rstrip('.')}. Some models take "
                            "only certain lengths (--max-length, --pad-to-multiple-of), or are not encoder "
                            "classifiers; on a GPU, out of memory: a smaller --batch-size") from e
        return out.logits.float()

    def train_epoch(self, epoch, p_route, teacher, shield_head=False):
        cfg = self.cfg
        self.model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.train))
        n = len(self.train)
        # Per-sample inputs and outputs in this epoch's order: a step reads and writes slices, with
        # no gather or scatter of its own (launches count in a host-bound GPU step); one gather of
        # the inputs and one scatter of the outputs per epoch.
        positions = torch.as_tensor(order, device=self.device)
        p_route = None if p_route is None else p_route[positions]
        teacher = None if teacher is None else teacher[positions]
        # the steps' per-sample CE and logits feed the clean-probability fit with --clean-prob-source
        # train-steps only; otherwise they are not kept (two copies per step saved)
        record = cfg.clean_prob_source == "train-steps"
        # the cross-entropy apart from the consistency term, which adds the teacher's entropy to the loss
        keep_ce = record or teacher is not None
        step_ce = torch.empty(n, device=self.device) if keep_ce else None
        step_logits = torch.empty(n, len(self.label_names), device=self.device) if record else None
        loss_sum = torch.zeros((), device=self.device)
        steps = range(0, n, cfg.batch_size)
        routed = torch.zeros(len(steps), device=self.device, dtype=torch.long)  # adapter passes per step
        for i, s in enumerate(tqdm(steps, desc=f"epoch {epoch + 1} steps", leave=False,
                                   disable=not cfg.progress)):
            e = min(s + cfg.batch_size, n)
            batch = self.train.batch(order[s:e], self.device)
            loss, ce, logits, masks = self.train_step(batch, None if p_route is None else p_route[s:e],
                                                      None if teacher is None else teacher[s:e], shield_head)
            if keep_ce:
                step_ce[s:e] = ce
            if record:
                step_logits[s:e] = logits.detach()
            loss_sum.add_(loss.detach(), alpha=e - s)
            if masks is not None:
                torch.sum(masks, (0, 1), out=routed[i])  # one launch; += would take two
        self._route(None)
        if self.head_shield is not None:
            self.head_shield.mask = None
        if self.router is None:
            routed_fraction = None
        else:
            routed_fraction = 1.0 if p_route is None else float(routed.sum()) / (n * self.router.num_layers)
        train_loss = float(loss_sum) / n
        return {"train_loss": train_loss, "train_ce": float(step_ce.mean()) if keep_ce else train_loss,
                "routed_fraction": routed_fraction,
                "step_ce": _unpermuted(step_ce, positions) if record else None,
                "step_logits": _unpermuted(step_logits, positions) if record else None}

    def train_step(self, batch, p_batch=None, teacher=None, shield_head=False):
        """One optimizer step on a batch (train mode is the caller's): routing masks drawn from the
        per-sample routing probabilities p_batch (None: every sample routed), forward, CleaR's loss
        (with consistency to the teacher logits when given), backward, AdamW. No host sync.
        Returns (loss, per-sample CE, logits, masks [B, L] or None)."""
        masks = self._route(p_batch)
        if shield_head:
            self.head_shield.mask = torch.rand(len(p_batch), device=self.device) < p_batch
        logits = self._logits(batch)
        loss, ce = clear_loss(logits, batch["labels"], teacher, self.cfg.consistency_weight, self.cfg.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss, ce, logits, masks

    @torch.inference_mode()
    def predict(self, split, gamma, passes, desc):
        """Average logits of `passes` no-grad passes; each adapter on w.p. gamma (None: all on)."""
        self.model.eval()
        out = torch.zeros(len(split), len(self.label_names), device=self.device)
        batches = list(split.sorted_batches(self.cfg.eval_batch_size, self.device))  # padded once, not per pass
        if self._share_prefix and gamma is not None and passes > 1:
            return self._predict_shared(batches, out, gamma, passes, desc)
        for _ in range(passes):
            for batch in tqdm(batches, desc=desc, leave=False, disable=not self.cfg.progress):
                n = len(batch["index"])
                self._route(None if gamma is None else torch.full((n,), gamma, device=self.device))
                out[batch["index"]] += self._logits(batch)
        self._route(None)
        return out / passes

    def _predict_shared(self, batches, out, gamma, passes, desc):
        """predict's passes run together, sharing their common prefix (model.shared_prefix_passes).
        The masks are drawn first, in the order the passes run one after another draw them: the
        same random stream, so the same masks as separate passes. A few samples of the run's first
        batch are also computed as separate passes and compared; on a difference (a layer whose
        arguments the sharing cannot split by sample) the run goes back to separate passes, with a
        warning."""
        L = self.router.num_layers
        draws = [[draw_routing_masks(torch.full((len(b["index"]),), gamma, device=self.device), L) for b in batches]
                 for _ in range(passes)]
        for k, batch in enumerate(tqdm(batches, desc=desc, leave=False, disable=not self.cfg.progress)):
            masks = [d[k] for d in draws]
            logits = self._shared_logits(batch, masks) if self._share_prefix else None
            if logits is None:
                logits = sum(self._masked_logits(batch, m) for m in masks)
            out[batch["index"]] += logits
        self._route(None)
        return out / passes

    def _masked_logits(self, batch, masks):
        self.router.set_masks(masks)
        return self._logits(batch)

    def _shared_logits(self, batch, masks, check_samples=8):
        """Summed logits of the passes with these masks from one shared-prefix forward; None (and
        sharing off for the run) when it fails or, on the run's first batch, when its first
        check_samples samples disagree with separate passes."""
        if not self._share_prefix_checked:
            self._share_prefix_checked = True
            few = {k: batch[k][:check_samples] for k in ("input_ids", "attention_mask")}
            few_masks = [m[:check_samples] for m in masks]
            try:
                got = self._shared_forward(few, few_masks)
            except Exception as e:  # a layer the sharing cannot drive
                return self._stop_sharing(f"{type(e).__name__}: {e}")
            with without_cudnn_attention():  # the attention the shared forward runs, like for like
                want = sum(self._masked_logits(few, m) for m in few_masks)
            err = float((got - want).abs().max())
            if not err <= 1e-3 * (1 + float(want.abs().max())):
                return self._stop_sharing(f"its logits differ from separate passes by {err:.3g}")
        try:
            return self._shared_forward(batch, masks)
        except Exception as e:
            return self._stop_sharing(f"{type(e).__name__}: {e}")

    def _shared_forward(self, batch, masks):
        passes, n = len(masks), batch["input_ids"].shape[0]
        rows = {k: batch[k].repeat(passes, 1) for k in ("input_ids", "attention_mask")}
        with shared_prefix_passes(self.model, self.router, torch.cat(masks), passes):
            return self._logits(rows).view(passes, n, -1).sum(0)

    def _stop_sharing(self, why):
        self._share_prefix = False
        warnings.warn(f"clean-probability pass: the shared-prefix pass is off for this run ({why}); "
                      "running the ensemble passes one after another")
        return None

    def evaluate(self, split):
        if split is None:
            return None
        stochastic = self.routed and self.cfg.eval_routing == "stochastic"
        logits = self.predict(split, self.cfg.gamma if stochastic else None, 1, "evaluate")
        return metrics.accuracy(logits.argmax(-1).cpu().numpy(), split.labels.numpy())

    def clean_probability_pass(self, epoch_result):
        """Per-sample losses -> Gaussian mixture -> p_clean, plus the teacher logits (zbar)."""
        cfg = self.cfg
        labels = self.train.labels.to(self.device)
        t0 = time.perf_counter()
        if cfg.clean_prob_source == "train-steps":
            zbar = epoch_result["step_logits"]
            losses = epoch_result["step_ce"]
        else:
            passes = cfg.ensemble_passes if self.routed else 1
            zbar = self.predict(self.train, cfg.gamma if self.routed else None, passes, "clean-probability pass")
            losses = torch.nn.functional.cross_entropy(zbar, labels, reduction="none")
        t1 = time.perf_counter()
        losses64 = losses.double() if losses.device.type == "cpu" else losses
        try:
            p_clean, gmm = clean_probability(losses64, normalize=cfg.normalize_losses,
                                             labels=labels if cfg.classwise_losses else None)
        except ValueError:
            self._check_finite(losses)  # checked only on failure: no host sync in a normal epoch
            raise
        t2 = time.perf_counter()
        return {"zbar": zbar, "losses": losses.float(), "p_clean": p_clean.float().to(self.device), "gmm": gmm,
                "pass_s": t1 - t0, "mixture_s": t2 - t1}

    def _check_finite(self, losses):
        bad = int((~torch.isfinite(losses)).sum())
        if bad:
            cfg = self.cfg
            raise TrainingDiverged(
                f"training diverged: {bad} of {len(losses)} per-sample training losses are NaN or infinite. "
                f"Start again (--overwrite) with a lower --learning-rate (this run: {cfg.lr:g})"
                + (" or without --bf16" if cfg.bf16 else ""))

    # -- checkpointing ------------------------------------------------------------------------
    def save_checkpoint(self, epoch, state):
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        io.torch_save({"epoch": epoch, "trainable": trainable, "optimizer": self.optimizer.state_dict(),
                       "data": self.data_fingerprint,
                       **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()}},
                      self.out / "checkpoint.pt")
        self.checkpoint_epoch = epoch

    def load_checkpoint(self):
        ck = torch.load(self.out / "checkpoint.pt", map_location="cpu", weights_only=False)
        self.check_same_data(ck.get("data"))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in ck["trainable"].items():
                params[n].copy_(v)
        self.optimizer.load_state_dict(ck["optimizer"])
        self.checkpoint_epoch = ck["epoch"]
        return ck

    def check_same_data(self, saved):
        """--resume on other data would go on with the old run's clean probabilities and teacher
        logits for samples they do not belong to. (Checkpoints of earlier versions hold no
        fingerprint: nothing to compare.)"""
        if saved is None:
            return
        changed = []
        for split, now in self.data_fingerprint.items():
            then = saved.get(split)
            if then == now:
                continue
            count = lambda f: "none" if f is None else f"{f['samples']} samples"
            changed.append(f"the {split} data ({count(then)} then, {count(now)} now)" if count(then) != count(now)
                           else f"the {split} data (as many samples, {now['samples']}, but other texts or labels)")
        if changed:
            raise UserError(f"--resume: the run in {self.out} was trained on other data: {'; '.join(changed)}. "
                            "Resume with the data it was made with, or start a new run (--overwrite or "
                            "another --output-dir)")

    # -- the whole run -------------------------------------------------------------------------
    def run(self):
        tf32 = self.cfg.tf32 and self.device.type == "cuda"
        if self.cfg.tf32 and not tf32:
            warnings.warn("--tf32 has no effect on the CPU: float32 products stay IEEE")
        if self.cfg.compile and self.device.type == "cpu":
            warnings.warn("--compile on the CPU: the first epoch spends minutes compiling, and compiled steps "
                          "have run slower than eager ones on the CPU (README, Performance); it is meant for GPUs")
        with float32_matmul_precision("high" if tf32 else None):  # cuBLAS and the routed kernels read it
            return self._run()

    def _run(self):
        cfg = self.cfg
        t_start = time.perf_counter()
        self.check_output_dir()
        torch.manual_seed(cfg.seed)  # adapter and head initialisation
        self.load()
        ck = self.load_checkpoint() if cfg.resume else None  # checks the data before anything is written
        self.prepare_output_dir()
        records, start, pass_out = [], 0, None
        p_clean = teacher = None
        if cfg.resume:
            start = ck["epoch"] + 1
            records = io.read_jsonl(self.out / "metrics.jsonl")[:start]
            p_clean = ck["p_clean"].to(self.device) if ck.get("p_clean") is not None else None
            teacher = ck["teacher"].to(self.device) if ck.get("teacher") is not None else None
            pass_out = ck.get("last_pass")
            print(f"resuming {self.out} after epoch {start} of {cfg.num_epochs}")
        clean_t = torch.as_tensor(self.clean_mask, dtype=torch.float32, device=self.device)
        best_dev = max((r["dev_accuracy"] for r in records if r["dev_accuracy"] is not None),
                       default=-1.0)  # --keep-model best-dev (which needs a dev split)
        warned = False  # about classes without a likely-clean sample: once a run
        bar = tqdm(range(start, cfg.num_epochs), desc=f"{cfg.method} on {self.data_name}", disable=not cfg.progress)
        for epoch in bar:
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # routing and dropout: the same draws on resume
            warm = epoch < cfg.warmup_epochs
            p_route = teacher_e = None
            if self.routed:
                if warm or p_clean is None:
                    p_route = torch.full((len(self.train),), cfg.gamma, device=self.device)
                else:
                    source = clean_t if cfg.method == "oracle-lora" else p_clean
                    p_route = cfg.gamma * source
                    teacher_e = teacher
            t0 = time.perf_counter()
            ep = self.train_epoch(epoch, p_route, teacher_e, shield_head=self.head_shield is not None and not warm)
            t1 = time.perf_counter()
            test_acc, dev_acc = self.evaluate(self.test), self.evaluate(self.dev)
            t2 = time.perf_counter()
            cp = self.clean_probability_pass(ep)
            p_clean, teacher = cp["p_clean"], cp["zbar"]
            if cfg.method == "clear-lora" and cfg.warmup_epochs <= epoch + 1 < cfg.num_epochs and not warned:
                warned = self._warn_unrouted_classes(epoch, p_clean)
            record = self._record(epoch, warm, ep, cp, test_acc, dev_acc,
                                  {"train_s": t1 - t0, "eval_s": t2 - t1, "clean_pass_s": cp["pass_s"],
                                   "mixture_s": cp["mixture_s"]})
            records.append(record)
            io.write_jsonl(self.out / "metrics.jsonl", records)
            pass_out = {"losses": cp["losses"].cpu(), "p_clean": p_clean.cpu(),
                        "pred": teacher.argmax(-1).cpu(), "mixture": record["mixture"]}
            if cfg.plots:
                plots.loss_histogram(pass_out["losses"].numpy(), self.clean_mask if self._noisy() else None,
                                     record["mixture"], self.out / "plots" / f"loss_hist_epoch{epoch + 1:02d}.png",
                                     f"{cfg.method}, epoch {epoch + 1}: per-sample training loss")
                noise = f"{cfg.noise_type} noise {cfg.noise_rate:g}" if cfg.injects_noise else "labels as given"
                plots.curves(records, self.out / "plots" / "curves.png", f"{cfg.method} on {self.data_name}, {noise}",
                             cfg.injects_noise)
            if cfg.keep_model == "best-dev" and dev_acc > best_dev:  # saved before the checkpoint: a resumed
                best_dev = dev_acc                                     # run never lacks it
                self.save_model(epoch)
            self.save_checkpoint(epoch, {"p_clean": p_clean, "teacher": teacher, "last_pass": pass_out})
            tqdm.write(_epoch_line(record, cfg.num_epochs))
        results = self.finish(records, pass_out, time.perf_counter() - t_start)
        return results

    def _warn_unrouted_classes(self, epoch, p_clean):
        """Warn (and return True) when the clean probabilities that route the next epoch leave whole
        classes without a likely-clean sample: the failure docs/results.md found on banking77."""
        lost = metrics.classes_without_likely_clean(p_clean.cpu().numpy(), self.train.labels.numpy())
        if not lost:
            return False
        names = [self.label_names[k] for k in lost[:5]] + (["..."] if len(lost) > 5 else [])
        classes = len(np.unique(self.train.labels.numpy()))
        fix = "" if self.cfg.classwise_losses else "; --classwise-losses centres the losses per class against it"
        warnings.warn(f"epoch {epoch + 1}: {len(lost)} of {classes} classes have no sample whose clean probability "
                      f"is above 0.5 ({', '.join(names)}): the adapters will see few of their samples and may stop "
                      f"learning them{fix}", UserWarning, stacklevel=2)
        return True

    def _noisy(self):
        return bool((~self.clean_mask).any())

    def _record(self, epoch, warm, ep, cp, test_acc, dev_acc, times):
        p = cp["p_clean"].cpu().numpy()
        pred = cp["zbar"].argmax(-1).cpu().numpy()
        rec = {"epoch": epoch + 1, "phase": "warm-up" if (warm and self.routed) else "train",
               "train_loss": ep["train_loss"], "train_ce": ep["train_ce"], "test_accuracy": test_acc,
               "dev_accuracy": dev_acc,
               "routed_fraction": ep["routed_fraction"], "mixture": metrics.mixture_summary(cp["gmm"])}
        det = metrics.clean_detection(p, self.clean_mask, true_labels=self.true_labels.numpy())
        rec.update({"clean_" + k: v for k, v in det.items()})
        # the pass's losses rank too (the mixture fits them, centred per class with --classwise-losses): its
        # posterior is exactly 0 for much of the noisy component, ties that clean_auroc ranks at random
        # (per_sample.csv orders them by this loss)
        rec["clean_loss_auroc"] = metrics.clean_detection(-cp["losses"].cpu().numpy(), self.clean_mask)["auroc"]
        rec.update(metrics.training_fit(pred, self.train.labels.numpy(), self.true_labels.numpy(), self.clean_mask))
        rec["time_s"] = {k: round(v, 3) for k, v in times.items()}
        rec["epoch_s"] = round(sum(times.values()), 3)
        return rec

    def finish(self, records, pass_out, wall):
        cfg = self.cfg
        test = [r["test_accuracy"] for r in records]
        best = int(np.argmax(test))
        results = {"method": cfg.method, "dataset": self.data_name, "data_notes": self.data_notes,
                   "noise": self.noise_info,
                   "num_train": len(self.train), "num_test": len(self.test),
                   "num_dev": len(self.dev) if self.dev is not None else 0,
                   "best_test_accuracy": test[best], "best_epoch": best + 1, "last_test_accuracy": test[-1]}
        if all(r["dev_accuracy"] is not None for r in records):
            b = int(np.argmax([r["dev_accuracy"] for r in records]))
            results.update({"dev_selected_test_accuracy": test[b], "dev_selected_epoch": b + 1})
        last = records[-1]
        results["final_clean_detection"] = {k: last.get("clean_" + k) for k in
                                            ("auroc", "average_precision", "precision", "recall",
                                             "class_mean_recall", "classes_none_found")}
        results["final_mixture"] = last["mixture"]
        results.update({"config": cfg.to_dict(), "versions": _versions(), "device": _device_name(self.device),
                        "wall_time_s": round(wall, 1), "epoch_time_s": [r["epoch_s"] for r in records]})
        self.write_per_sample(pass_out)
        if cfg.save_adapter:
            if cfg.keep_model == "last":
                self.save_model(len(records) - 1)
            final = self.saved_model_dir()
            results["model_dir"] = str(final)
            results["model_epoch"] = json.loads((final / "labels.json").read_text())["epoch"]
        io.write_json(self.out / "results.json", results)
        return results

    def write_per_sample(self, pass_out):
        buf = _io.StringIO()
        w = csv.writer(buf)
        injected = self.cfg.injects_noise  # else the truth is not known
        # index: position in the training set as run; row: in the source (predict's row)
        w.writerow(["index", "row", "observed_label", *(["true_label", "flipped"] if injected else []), "loss",
                    "clean_probability", "predicted_label", "text"])
        p, losses, pred = (pass_out[k].numpy() for k in ("p_clean", "losses", "pred"))
        names, obs, true = self.label_names, self.train.labels.numpy(), self.true_labels.numpy()
        rows = self.train_split.rows
        for i in np.lexsort((-losses, p)):  # least likely clean first, then highest loss
            truth = [names[true[i]], int(obs[i] != true[i])] if injected else []
            w.writerow([i, rows[i], names[obs[i]], *truth, f"{losses[i]:.6g}", f"{p[i]:.6g}", names[pred[i]],
                        self.train_split.texts[i]])
        io.write_text(self.out / "per_sample.csv", buf.getvalue())

    def saved_model_dir(self):
        return self.out / ("model" if self.cfg.method == "full" else "adapter")

    def save_model(self, epoch):
        """The model as it is after epoch (0-based) into adapter/ (model/ for full fine-tuning), whole
        or not at all."""
        import tempfile

        final = self.saved_model_dir()
        tmp = Path(tempfile.mkdtemp(dir=self.out, prefix=".model."))
        if self.cfg.method == "full":
            with quiet_transformers():  # no "Writing model shards" bar, which --no-progress did not stop
                self.model.save_pretrained(str(tmp))
                self.tokenizer.save_pretrained(str(tmp))  # model/ loads on its own in transformers
        else:
            save_peft_adapter(self.model, self.router, self.model_path, tmp)
        write_labels_json(tmp, self.label_names, self.model_path, epoch + 1, self.max_length)
        io.replace_dir(tmp, final)
        return final


def _unpermuted(values, positions):
    """values[i] belongs to sample positions[i]: the same values in sample order."""
    out = torch.empty_like(values)
    out[positions] = values
    return out


def _epoch_line(r, total):
    ce = r.get("train_ce", r["train_loss"])  # apart from the consistency term (older runs: not recorded)
    loss = f"loss {r['train_loss']:.3f}" + (f" (CE {ce:.3f})" if abs(ce - r["train_loss"]) > 5e-4 else "")
    parts = [f"epoch {r['epoch']}/{total} ({r['phase']})", loss, f"test {r['test_accuracy']:.4f}"]
    if r["dev_accuracy"] is not None:
        parts.append(f"dev {r['dev_accuracy']:.4f}")
    if r.get("clean_auroc") is not None:
        parts.append(f"clean AUROC {r['clean_auroc']:.3f}")
    if r["routed_fraction"] is not None:
        parts.append(f"routed {r['routed_fraction']:.2f}")
    parts.append(f"{r['epoch_s']:.0f}s")
    return "  ".join(parts)


def _fingerprint(split, label_names):
    """Sample count and a hash of the texts and label names of a split (None: no such split)."""
    if split is None:
        return None
    h = hashlib.sha256()
    for text, label in zip(split.texts, split.labels):
        h.update(f"{text}\x1f{label_names[label]}\x1e".encode())
    return {"samples": len(split), "sha256": h.hexdigest()}


@contextlib.contextmanager
def float32_matmul_precision(precision):
    """torch's float32 matmul precision inside (None: unchanged), as it was afterwards."""
    before = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s), "
                            f"numbered from 0")
        return device
    return torch.device(name)


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions():
    import sklearn
    import transformers

    import clear_fast

    return {"clear_fast": clear_fast.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def train(config: TrainConfig):
    return Run(config).run()
