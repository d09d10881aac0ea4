#!/usr/bin/env python3
"""Train specoff's demo pair on the interpreter's standard library, in minutes on one GPU.

A byte-level BPE tokenizer, a small Mixtral target (4 experts, top-2) trained on the stdlib's
Python files, then a Llama draft several times smaller distilled from it (loss = KL(target ‖
draft) on the target's logits), so that the draft's greedy guesses match the target's. The
modules listed in `specoff.demo.HELD_OUT` are never trained on; every phase stops by wall
clock and reports held-out loss. The folders are saved in float16 with `transformers`'
`save_pretrained`, reloaded by specoff, and checked (logits equal to transformers', greedy
speculation equal to the target's greedy output) before the script ends.

    python tools/train_demo_pair.py                          # GPU, writes specoff/demo/
    python tools/train_demo_pair.py --tiny --out /tmp/tiny   # CPU smoke run, seconds
"""
import time

T0 = time.perf_counter()  # the --minutes budget counts from here, imports included

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from specoff import demo  # noqa: E402

SIZE_LIMIT = 24_000_000  # bytes, both folders together (the 24 MB)
MAX_POSITIONS = 2048
FINISH_SECONDS = 60  # kept from --minutes for saving and the specoff checks


@dataclass
class Sizes:
    vocab: int
    seq_len: int
    batch: int
    target: dict  # MixtralConfig fields
    draft: dict  # LlamaConfig fields
    target_lr: float = 1.5e-3
    draft_lr: float = 2e-3
    # The stdlib is ~2.2 M tokens: a GPU could run ~100 epochs in the time budget, far past
    # the point where held-out loss stops improving, so each phase also ends after this
    # many passes over the training tokens (the learning-rate schedule follows whichever
    # limit, time or epochs, comes first).
    target_epochs: float = 40.0
    draft_epochs: float = 60.0
    dropout: float = 0.1  # on the target's attention and MoE outputs: the stdlib is small
    warmup_steps: int = 200
    val_every_s: float = 20.0
    val_tokens: int = 1 << 16  # validation tokens per check (best-checkpoint choice)
    eval_tokens: int = 1 << 18  # held-out tokens for the losses printed after each phase
    max_files: Optional[int] = None  # only the first N training files (tiny)
    max_steps: Optional[int] = None  # per phase (tiny)
    check_new_tokens: int = 64


ATTENTION = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=32)
FULL = Sizes(
    vocab=4096, seq_len=1024, batch=32,
    target=dict(hidden_size=256, intermediate_size=320, num_hidden_layers=6,
                num_local_experts=4, num_experts_per_tok=2, **ATTENTION),
    draft=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, **ATTENTION))
TINY = Sizes(
    vocab=512, seq_len=128, batch=4,
    target=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    draft=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16),
    warmup_steps=5, val_every_s=5.0, val_tokens=2048, eval_tokens=4096, max_files=40,
    max_steps=25, check_new_tokens=12)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


# -- data -----------------------------------------------------------------------------------

@dataclass
class Data:
    root: Path
    train: list  # (relative path, bytes) of the files trained on
    validation: list  # training-distribution files kept apart to pick the best checkpoint
    held_out: list  # the HELD_OUT modules' files, never trained on
    skipped: list  # files that are not UTF-8
    texts: dict = field(repr=False, default_factory=dict)


def collect(sizes: Sizes) -> Data:
    root = demo.stdlib_root()
    data = Data(root, [], [], [], [])
    names = demo.training_files(root)
    if sizes.max_files:
        names = names[:sizes.max_files]
    for i, rel in enumerate(names):
        text = demo.read_source(root / rel)
        if text is None:
            data.skipped.append(rel)
            continue
        data.texts[rel] = text
        # Every 40th file (20th when tiny) goes to validation: a deterministic split.
        (data.validation if i % (20 if sizes.max_files else 40) == 7 else data.train).append(
            (rel, len(text.encode())))
    for path in demo.held_out_files(root):
        rel = path.relative_to(root).as_posix()
        text = demo.read_source(path)
        if text is None:
            data.skipped.append(rel)
            continue
        data.texts[rel] = text
        data.held_out.append((rel, len(text.encode())))
    if not data.train or not data.held_out:
        raise SystemExit(f"error: no usable stdlib files under {root}")
    return data


def train_tokenizer(texts, vocab: int):
    """Byte-level BPE; the one special token is both EOS and BOS (prepended to inputs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[demo.EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    eos = tok.token_to_id(demo.EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{demo.EOS_TOKEN} $A", pair=f"{demo.EOS_TOKEN} $A {demo.EOS_TOKEN} $B",
        special_tokens=[(demo.EOS_TOKEN, eos)])
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=demo.EOS_TOKEN,
                                 eos_token=demo.EOS_TOKEN, model_max_length=MAX_POSITIONS,
                                 clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(folder))
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # a name transformers 4 and 5 both know
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")


def stream_of(tok, data: Data, names) -> torch.Tensor:
    return demo.token_stream(tok, [data.texts[n] for n, _ in names], tok.token_to_id(demo.EOS_TOKEN))


# -- models ---------------------------------------------------------------------------------

def make_model(family: str, fields: dict, vocab: int, eos: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=vocab, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
              bos_token_id=eos, eos_token_id=eos, rms_norm_eps=1e-5, initializer_range=0.02,
              **fields)
    if family == "mixtral":
        kw.update(sliding_window=None, router_aux_loss_coef=0.01)
    config = AutoConfig.for_model(family, **kw)
    torch.manual_seed(seed)
    try:  # the plain per-expert loop: autocast-friendly on every transformers 5 release
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                experts_implementation="eager")
    except (TypeError, ValueError):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def add_dropout(model, p: float) -> None:
    """Dropout on each layer's attention output and feed-forward output (training only)."""
    if p <= 0:
        return

    def hook(module, args, out):
        if isinstance(out, tuple):  # an MoE block that also returns router logits
            return (F.dropout(out[0], p, module.training),) + out[1:]
        return F.dropout(out, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied head counts once


# -- training -------------------------------------------------------------------------------

class Batches:
    """Random windows of seq_len + 1 tokens from one token stream (seeded)."""

    def __init__(self, stream: torch.Tensor, sizes: Sizes, device, seed: int):
        self.stream = stream.to(device)
        self.sizes, self.device = sizes, device
        self.offsets = torch.arange(sizes.seq_len + 1, device=device)
        self.g = torch.Generator().manual_seed(seed)

    def next(self):
        starts = torch.randint(0, len(self.stream) - self.sizes.seq_len - 1,
                               (self.sizes.batch, 1), generator=self.g).to(self.device)
        chunk = self.stream[starts + self.offsets]  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]


def windows(stream: torch.Tensor, seq_len: int, max_tokens: int):
    """The stream cut into (n, seq_len) inputs and targets, at most max_tokens of them."""
    n = min(len(stream) - 1, max_tokens) // seq_len
    if n == 0:  # a stream shorter than one window
        seq_len, n = len(stream) - 1, 1
    x = stream[:n * seq_len].view(n, seq_len)
    y = stream[1:n * seq_len + 1].view(n, seq_len)
    return x, y


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def measure(target, draft, stream, sizes: Sizes, device, max_tokens: int) -> dict:
    """Losses (and, with a draft, KL to the target and argmax agreement) on a stream."""
    x_all, y_all = windows(stream, sizes.seq_len, max_tokens)
    was = [m.training for m in (target, draft) if m is not None]
    target.eval()
    if draft is not None:
        draft.eval()
    sums, n = dict(target_loss=0.0, draft_loss=0.0, kl=0.0, agreement=0.0), 0
    for i in range(0, len(x_all), sizes.batch):
        x, y = x_all[i:i + sizes.batch].to(device), y_all[i:i + sizes.batch].to(device)
        with autocast(device):
            t = target(input_ids=x, use_cache=False).logits.float()
            sums["target_loss"] += F.cross_entropy(t.flatten(0, 1), y.flatten(), reduction="sum").item()
            if draft is not None:
                d = draft(input_ids=x, use_cache=False).logits.float()
                sums["draft_loss"] += F.cross_entropy(d.flatten(0, 1), y.flatten(), reduction="sum").item()
                sums["kl"] += F.kl_div(F.log_softmax(d, -1), F.log_softmax(t, -1), log_target=True,
                                       reduction="sum").item()
                sums["agreement"] += (d.argmax(-1) == t.argmax(-1)).sum().item()
        n += y.numel()
    for m, mode in zip((target, draft), was):
        m.train(mode)
    out = {k: v / n for k, v in sums.items()} if draft is not None else {"target_loss": sums["target_loss"] / n}
    return dict(out, tokens=n)


def train_phase(name: str, model, step_loss, val_metric, batches: Batches, sizes: Sizes,
                lr: float, seconds: float, max_tokens: float, device) -> dict:
    """AdamW with warmup and a cosine decay over the phase's progress (the largest of the
    elapsed share of `seconds`, the share of `max_tokens` seen and, when tiny, the share of
    max_steps done); the weights with the best validation figure are kept."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1),
                             dict(params=no_decay, weight_decay=0.0)], lr=lr, betas=(0.9, 0.95),
                            **({"fused": True} if device.type == "cuda" else {}))
    model.train()
    start = time.perf_counter()
    step, tokens, last_log, last_val, logged_step = 0, 0, start, start, 0
    running = torch.zeros((), device=device)
    best = dict(value=math.inf, step=0, state=None)
    history = []
    log(f"{name}: {parameters(model) / 1e6:.2f} M parameters, at most {seconds:.0f} s or "
        f"{max_tokens / 1e6:.0f} M tokens, batch {sizes.batch} × {sizes.seq_len} tokens")

    def validate():
        value = val_metric(model)
        history.append(dict(step=step, tokens=tokens, seconds=round(time.perf_counter() - start, 1),
                            validation=value))
        if value < best["value"]:
            best.update(value=value, step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return value

    while True:
        now = time.perf_counter()
        frac = max((now - start) / seconds if seconds > 0 else 1.0, tokens / max_tokens,
                   step / sizes.max_steps if sizes.max_steps else 0.0)
        if frac >= 1 and step > 0:  # every phase takes a step, however short its share
            break
        scale = min(1.0, (step + 1) / sizes.warmup_steps) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x, y = batches.next()
        with autocast(device):
            loss = step_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.detach()
        step += 1
        tokens += x.numel()
        now = time.perf_counter()
        if now - last_log >= 15 or step == 1:
            log(f"{name} step {step}: train loss {running.item() / (step - logged_step):.4f}, "
                f"lr {lr * scale:.2e}, {tokens / (now - start) / 1e3:.0f} k tokens/s")
            running.zero_()
            last_log, logged_step = now, step
        if now - last_val >= sizes.val_every_s:
            log(f"{name} step {step}: validation {validate():.4f}")
            last_val = time.perf_counter()
    train_loss = loss.item() if step else math.nan
    final = validate()
    if best["state"] is not None and best["step"] != step:
        model.load_state_dict(best["state"])
    elapsed = time.perf_counter() - start
    log(f"{name}: {step} steps, {tokens / 1e6:.1f} M tokens in {elapsed:.0f} s; validation "
        f"{final:.4f} at the end, best {best['value']:.4f} at step {best['step']} (kept)")
    model.eval()
    return dict(steps=step, tokens_seen=tokens, seconds=round(elapsed, 1),
                train_loss=train_loss, validation=best["value"], final_validation=final,
                kept_step=best["step"], validation_history=history)


# -- saving and checking ----------------------------------------------------------------------

def save(model, tok, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model = model.to("cpu").half()
    model.config.dtype = torch.float16
    model.config.use_cache = True
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)  # config.json has BOS/EOS
    save_tokenizer(tok, folder)
    for file in folder.iterdir():
        file.chmod(0o644)
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16", config


PAIR_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def bundle(out: Path, dest: Path) -> None:
    """The pair as three files (the GPU machine sends back at most 8, of ≤ 16 MiB each):
    each model's weights, and a tar of the configs, tokenizers and manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("target", "draft"):
        shutil.copyfile(out / name / "model.safetensors", dest / f"{name}.safetensors")
        if (dest / f"{name}.safetensors").stat().st_size > 16 << 20:
            log(f"warning: {name}.safetensors is over 16 MiB, too large to come back")
    with tarfile.open(dest / "rest.tar", "w") as tar:
        tar.add(out / "manifest.json", arcname="manifest.json")
        for name in ("target", "draft"):
            for file in PAIR_FILES:
                tar.add(out / name / file, arcname=f"{name}/{file}")
    log(f"bundled into {dest}: target.safetensors, draft.safetensors, rest.tar")


def unbundle(src: Path, out: Path) -> None:
    """The inverse of bundle: the folders and manifest back into `out`."""
    with tarfile.open(src / "rest.tar") as tar:
        wanted = {"manifest.json"} | {f"{n}/{f}" for n in ("target", "draft") for f in PAIR_FILES}
        members = [m for m in tar.getmembers() if m.isfile() and m.name in wanted]
        for name in ("target", "draft"):
            if (out / name).exists():
                shutil.rmtree(out / name)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(out, members=members, **safe)
    for name in ("target", "draft"):
        shutil.copyfile(src / f"{name}.safetensors", out / name / "model.safetensors")
    print(f"unpacked the pair from {src} into {out}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@torch.inference_mode()
def check_with_specoff(out: Path, new_tokens: int) -> dict:
    """Reload both folders with transformers and specoff (CPU, fp32): equal logits, the
    held-out α stored in the manifest, and greedy speculation equal to the target's output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import specoff
    from specoff.weights import load_tokenizer

    report = {}
    target, draft = out / "target", out / "draft"
    ids = None
    for folder in (target, draft):
        hf_tok = AutoTokenizer.from_pretrained(str(folder))
        ours_tok = load_tokenizer(folder)
        assert ours_tok is not None, f"specoff cannot load the tokenizer in {folder}"
        ids = hf_tok(demo.DEFAULT_PROMPT)["input_ids"]
        assert ids == ours_tok(demo.DEFAULT_PROMPT)["input_ids"]
        assert ids[0] == hf_tok.convert_tokens_to_ids(demo.EOS_TOKEN), "BOS is not prepended"
        assert hf_tok.decode(ids, skip_special_tokens=True) == demo.DEFAULT_PROMPT
        ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ours = specoff.load_model(folder, device="cpu", dtype="float32")
        x = torch.tensor([ids])
        expect, got = ref(x).logits, ours(x)
        err = ((got - expect).abs().max() / expect.abs().max()).item()
        assert err <= 1e-4, f"{folder.name}: specoff's logits differ from transformers' by {err:.2e}"
        report[f"{folder.name}_logit_error"] = err
    t_model = specoff.load_model(target, device="cpu", dtype="float32")
    d_model = specoff.load_model(draft, device="cpu", dtype="float32")
    windows = demo.held_out_windows(load_tokenizer(target), demo.ALPHA_TOKENS)
    report["heldout"] = demo.teacher_forced(t_model, d_model, windows)
    log(f"held-out (CPU, fp32, {report['heldout']['tokens']} tokens): target loss "
        f"{report['heldout']['target_loss']:.4f}, draft loss {report['heldout']['draft_loss']:.4f}, "
        f"greedy α {report['heldout']['alpha']:.3f}")

    prompts = [demo.DEFAULT_PROMPT] + demo.humaneval_prompts(2)
    params = specoff.SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    plain = specoff.LLM(target, device="cpu", dtype="float32").generate(prompts, params)
    log("greedy sample from the target:\n" + demo.DEFAULT_PROMPT + plain[0].text)
    log("HumanEval/0 completion:\n" + prompts[1] + plain[1].text)
    runs = {"chain_gamma4": dict(spec="chain", draft_len=4, interleave=False),
            "tree_budget64": dict(spec="tree", tree_budget=64)}
    report["generation"] = {}
    for name, kw in runs.items():
        llm = specoff.LLM(target, draft=draft, device="cpu", dtype="float32", **kw)
        outs = llm.generate(prompts, params)
        s = llm.last_stats
        same = [o.token_ids for o in outs] == [o.token_ids for o in plain]
        report["generation"][name] = dict(acceptance_rate=s.acceptance_rate,
                                          tokens_per_pass=s.tokens_per_pass, matches_target=same)
        log(f"{name}: acceptance {s.acceptance_rate:.3f}, {s.tokens_per_pass:.2f} tokens per "
            f"target pass, output {'equals' if same else 'DIFFERS FROM'} the target's")
    return report


# -- main -----------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(demo.DEMO_DIR),
                   help="folder to write target/, draft/ and manifest.json into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the whole run (default 9; tiny: 1)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, a few steps, CPU: a smoke run")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available; tiny: cpu)")
    p.add_argument("--batch", type=int, help="sequences per step (default 32; tiny 4)")
    p.add_argument("--target-epochs", type=float, help="most passes over the training tokens "
                   "for the target (default 40)")
    p.add_argument("--draft-epochs", type=float, help="the same for the draft (default 60)")
    p.add_argument("--dropout", type=float, help="target dropout (default 0.1)")
    p.add_argument("--target-share", type=float, default=0.6,
                   help="share of the training time spent on the target (the draft gets the rest)")
    p.add_argument("--bundle", help="also write the pair as 3 files into this folder (see "
                   "--unbundle): target.safetensors, draft.safetensors, rest.tar")
    p.add_argument("--unbundle", metavar="DIR",
                   help="only unpack a --bundle folder into --out, and stop")
    p.add_argument("--report", action="store_true",
                   help="also run specoff.demo.evaluate on the device and store it in the manifest")
    args = p.parse_args(argv)

    if args.unbundle:
        unbundle(Path(args.unbundle), Path(args.out))
        return 0
    import transformers

    transformers.utils.logging.disable_progress_bar()
    sizes = TINY if args.tiny else FULL
    for name in ("batch", "target_epochs", "draft_epochs", "dropout"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    minutes = args.minutes if args.minutes is not None else (1.0 if args.tiny else 9.0)
    finish = 10.0 if args.tiny else FINISH_SECONDS
    deadline = T0 + 60 * minutes - finish
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny
                                          else "cpu"))
    out = Path(args.out)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    data = collect(sizes)
    log(f"{len(data.train)} training files ({sum(b for _, b in data.train) / 1e6:.2f} MB), "
        f"{len(data.validation)} validation, {len(data.held_out)} held out, from {data.root} "
        f"(Python {platform.python_version()})")
    tok = train_tokenizer([data.texts[n] for n, _ in data.train], sizes.vocab)
    eos = tok.token_to_id(demo.EOS_TOKEN)
    train_stream = stream_of(tok, data, data.train)
    val_stream = stream_of(tok, data, data.validation)
    held_stream = stream_of(tok, data, data.held_out)
    log(f"tokenizer: {tok.get_vocab_size()} tokens; streams: train {len(train_stream) / 1e6:.2f} M, "
        f"validation {len(val_stream) / 1e3:.0f} k, held out {len(held_stream) / 1e3:.0f} k tokens")

    target = make_model("mixtral", sizes.target, tok.get_vocab_size(), eos, args.seed).to(device)
    draft = make_model("llama", sizes.draft, tok.get_vocab_size(), eos, args.seed + 1).to(device)
    tokenizer_bytes = 2 * len(tok.to_str().encode()) + 4096  # tokenizer.json + config, twice
    expected = 2 * (parameters(target) + parameters(draft)) + tokenizer_bytes
    assert expected <= SIZE_LIMIT, f"the pair would take {expected / 1e6:.1f} MB > {SIZE_LIMIT / 1e6} MB"
    log(f"target {parameters(target) / 1e6:.2f} M parameters, draft {parameters(draft) / 1e6:.2f} M; "
        f"expected {expected / 1e6:.1f} MB in float16")
    add_dropout(target, sizes.dropout)

    def target_step(model, x, y):
        out = model(input_ids=x, use_cache=False, output_router_logits=True)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        return ce + model.config.router_aux_loss_coef * out.aux_loss

    def target_val(model):
        return measure(model, None, val_stream, sizes, device, sizes.val_tokens)["target_loss"]

    budget = deadline - time.perf_counter()
    t_report = train_phase("target", target, target_step, target_val,
                           Batches(train_stream, sizes, device, args.seed), sizes,
                           sizes.target_lr, args.target_share * budget,
                           sizes.target_epochs * len(train_stream), device)
    t_report["held_out"] = measure(target, None, held_stream, sizes, device, sizes.eval_tokens)
    log(f"target held-out loss {t_report['held_out']['target_loss']:.4f} "
        f"({t_report['held_out']['tokens']} tokens)")
    target.requires_grad_(False)

    def draft_step(model, x, y):
        with torch.no_grad():
            t = target(input_ids=x, use_cache=False).logits.float()
        d = model(input_ids=x, use_cache=False).logits.float()
        return F.kl_div(F.log_softmax(d, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")

    def draft_val(model):
        return measure(target, model, val_stream, sizes, device, sizes.val_tokens)["kl"]

    d_report = train_phase("draft", draft, draft_step, draft_val,
                           Batches(train_stream, sizes, device, args.seed + 1), sizes,
                           sizes.draft_lr, deadline - time.perf_counter(),
                           sizes.draft_epochs * len(train_stream), device)
    d_report["held_out"] = measure(target, draft, held_stream, sizes, device, sizes.eval_tokens)
    h = d_report["held_out"]
    log(f"draft held-out loss {h['draft_loss']:.4f}, KL to the target {h['kl']:.4f}, "
        f"greedy agreement α {h['agreement']:.3f} ({h['tokens']} tokens)")

    out.mkdir(parents=True, exist_ok=True)
    save(target, tok, out / "target")
    save(draft, tok, out / "draft")
    sizes_bytes = {"target": folder_bytes(out / "target"), "draft": folder_bytes(out / "draft")}
    sizes_bytes["total"] = sizes_bytes["target"] + sizes_bytes["draft"]
    log(f"saved to {out}: target {sizes_bytes['target'] / 1e6:.2f} MB, draft "
        f"{sizes_bytes['draft'] / 1e6:.2f} MB, total {sizes_bytes['total'] / 1e6:.2f} MB")
    assert sizes_bytes["total"] <= SIZE_LIMIT, f"{sizes_bytes['total']} bytes > {SIZE_LIMIT}"

    import tokenizers

    manifest = dict(
        python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, tokenizers=tokenizers.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        seed=args.seed, tiny=args.tiny, minutes=minutes,
        stdlib=str(data.root), held_out_modules=list(demo.HELD_OUT),
        excluded_dirs=sorted(demo.EXCLUDED_DIRS), max_file_bytes=demo.MAX_FILE_BYTES,
        training_files=[dict(path=n, bytes=b) for n, b in data.train],
        validation_files=[dict(path=n, bytes=b) for n, b in data.validation],
        held_out_files=[dict(path=n, bytes=b) for n, b in data.held_out],
        skipped_files=data.skipped,
        tokens=dict(train=len(train_stream), validation=len(val_stream), held_out=len(held_stream)),
        tokenizer=dict(kind="byte-level BPE", vocab_size=tok.get_vocab_size(),
                       eos_and_bos=demo.EOS_TOKEN),
        training=asdict(sizes),
        parameters=dict(target=parameters(target), draft=parameters(draft)),
        target=t_report, draft=d_report, bytes=sizes_bytes,
        training_seconds=round(t_report["seconds"] + d_report["seconds"], 1))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    if device.type == "cuda":
        torch.cuda.empty_cache()  # both models moved to the CPU when saved
    try:  # a failed check still leaves the trained pair and its manifest behind
        check = check_with_specoff(out, sizes.check_new_tokens)
        manifest.update(check)
        if args.report:
            manifest["report"] = demo.evaluate(device=device, target=out / "target",
                                               draft=out / "draft")
    finally:
        manifest["total_seconds"] = round(time.perf_counter() - T0, 1)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if args.bundle:
            bundle(out, Path(args.bundle))
    ok = all(g["matches_target"] for g in check["generation"].values())
    log(f"done in {manifest['total_seconds']:.0f} s: the pair in {out} works in specoff"
        + ("" if ok else " (BUT speculative output differs from the target's: see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
