"""Character-level language model on Shakespeare: embedding -> 2-layer LSTM or GRU -> linear.

Truncated backpropagation through time over one continuous character stream (the hidden state is
carried from batch to batch and detached), gradient clipping with the gradient norm logged,
validation perplexity next to a count-based n-gram baseline on the same split, and sampling with
a temperature from a prompt. Runs under torchrun with DistributedDataParallel.

    python examples/char_lm.py --quick                     # Hamlet, small model: ~1 min on a CPU
    python examples/char_lm.py                             # all of Shakespeare, GPU-sized model
    python examples/char_lm.py --quick --rnn nn            # the same model on torch.nn.LSTM
    torchrun --nproc-per-node 2 examples/char_lm.py --quick   # DDP (gloo on CPU, nccl on GPU)
    python examples/char_lm.py --load runs/char_lm/checkpoint.pt --epochs 0 --rnn nn   # evaluate + sample
"""
import argparse
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import data as datasets  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="character language model (fused_rnn example)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", choices=["shakespeare", "hamlet"], default="shakespeare")
    p.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seq-len", type=int, default=128, help="truncated-BPTT window")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--ngram", type=int, default=5, help="order of the count-based baseline")
    p.add_argument("--prompt", default="HAMLET.\n")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--sample-len", type=int, default=400)
    common.add_common_args(p, epochs=10, batch_size=64, lr=2e-3, out="runs/char_lm")
    return p


CPU = dict(corpus="hamlet", embed=64, hidden=256, seq_len=64, batch_size=32, epochs=20, lr=3e-3,
           lr_schedule="cosine", dropout=0.25, prompt="HAMLET\n", threads=1)
QUICK = dict(corpus="hamlet", embed=32, hidden=128, seq_len=64, batch_size=16, epochs=4, lr=5e-3,
             sample_len=200, prompt="HAMLET\n", threads=1)


def parse_args(argv=None):
    p = build_parser()
    return common.apply_preset(p.parse_args(argv), p, {"cpu": CPU, "quick": QUICK})


def load_text(args):
    if args.data_file:
        with open(args.data_file, encoding="utf-8") as f:
            return f.read()
    return datasets.hamlet() if args.corpus == "hamlet" else datasets.shakespeare()


class CharLM(nn.Module):
    def __init__(self, args, vocab_size):
        super().__init__()
        kind = args.cell.upper()
        self.embed = nn.Embedding(vocab_size, args.embed)
        self.drop = nn.Dropout(args.dropout)
        self.rnn = common.rnn_layer(args, kind, args.embed, args.hidden, args.layers,
                                    dropout=args.dropout if args.layers > 1 else 0.0, batch_first=True)
        self.head = nn.Linear(args.hidden, vocab_size)

    def forward(self, x, hidden=None):                 # x [B, T] character ids
        y, hidden = self.rnn(self.drop(self.embed(x)), hidden)
        return self.head(self.drop(y)), hidden


def detach(hidden):
    if hidden is None:
        return None
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


def batchify(ids, columns):
    """One long stream -> [columns, N]: each row a contiguous slice, read left to right."""
    n = ids.numel() // columns
    return ids[: n * columns].view(columns, n)


def windows(stream, seq_len):
    """(input, target) windows of the [B, N] stream, in order, so the hidden state carries over."""
    for i in range(0, stream.size(1) - 1, seq_len):
        t = min(seq_len, stream.size(1) - 1 - i)
        yield stream[:, i:i + t], stream[:, i + 1:i + 1 + t]


@torch.no_grad()
def evaluate(model, stream, args):
    model.eval()
    total, count, hidden = 0.0, 0, None
    for x, y in windows(stream, args.seq_len):
        logits, hidden = model(x, hidden)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / max(count, 1))


def ngram_perplexity(train_text, val_text, order, vocab_size):
    """Interpolated Witten-Bell character n-gram model: counts on the training text, perplexity on
    the validation text (each character predicted from up to order-1 previous ones)."""
    grams = [Counter() for _ in range(order)]            # grams[k]: counts of (k+1)-grams
    for k in range(order):
        grams[k].update(train_text[i:i + k + 1] for i in range(len(train_text) - k))
    ctx_total = [defaultdict(int) for _ in range(order)]  # ctx_total[k][h]: count of h followed by anything, |h| = k
    ctx_types = [defaultdict(int) for _ in range(order)]
    for k in range(1, order):
        for g, c in grams[k].items():
            ctx_total[k][g[:-1]] += c
            ctx_types[k][g[:-1]] += 1
    n_chars = len(train_text)
    nll = 0.0
    for i, ch in enumerate(val_text):
        p = (grams[0].get(ch, 0) + 1) / (n_chars + vocab_size)           # add-one unigram floor
        for k in range(1, min(order, i + 1)):
            h = val_text[i - k:i]
            tot = ctx_total[k].get(h, 0)
            if tot == 0:
                break                                                     # longer contexts unseen as well
            typ = ctx_types[k][h]
            p = (grams[k].get(h + ch, 0) + typ * p) / (tot + typ)
        nll -= math.log(p)
    return math.exp(nll / max(len(val_text), 1))


@torch.no_grad()
def sample(model, chars, prompt, length, temperature, device, seed=0):
    model.eval()
    index = {c: i for i, c in enumerate(chars)}
    prompt = "".join(c for c in prompt if c in index) or chars[0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.tensor([[index[c] for c in prompt]], device=device)
    out, hidden = [], None
    for _ in range(length):
        logits, hidden = model(x, hidden)
        probs = F.softmax(logits[0, -1].float() / max(temperature, 1e-6), dim=-1).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=g))
        out.append(chars[nxt])
        x = torch.tensor([[nxt]], device=device)
    model.train()
    return prompt + "".join(out)


@dataclass
class Result:
    losses: list = field(default_factory=list)       # training loss of every optimizer step
    grad_norms: list = field(default_factory=list)   # gradient norm before clipping, every step
    epoch_loss: list = field(default_factory=list)
    val_ppl: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)
    model: nn.Module = None
    chars: str = ""
    train_text: str = ""
    val_text: str = ""


def split_text(text, val_fraction):
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def train(args, text, chars=None, state=None):
    """Train on `text` (the first 1-val_fraction for training, the rest for validation) and
    return a Result; `losses` holds every step's training loss."""
    device = getattr(args, "device_obj", None) or common.pick_device(args.device)
    args.device_obj = device
    common.seed_everything(args.seed)
    chars = chars or "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    train_text, val_text = split_text(text, args.val_fraction)
    encode = lambda s: torch.tensor([index[c] for c in s if c in index], dtype=torch.long)  # noqa: E731
    rank, world = common.world()
    stream = batchify(encode(train_text), args.batch_size * world)[rank * args.batch_size:(rank + 1) * args.batch_size]
    stream = stream.to(device)
    val_stream = batchify(encode(val_text), min(args.batch_size, 16)).to(device)

    model = CharLM(args, len(chars)).to(device)
    if state is not None:
        model.load_state_dict(state, strict=True)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    res = Result(model=common.unwrap(model), chars=chars, train_text=train_text, val_text=val_text)
    timer = common.EpochTimer(device)
    steps_per_epoch = math.ceil((stream.size(1) - 1) / args.seq_len)
    sched = common.lr_scheduler(opt, args, steps_per_epoch)
    step = 0
    for epoch in range(args.epochs):
        timer.start()
        hidden, total, n = None, 0.0, 0
        bar = common.progress(windows(stream, args.seq_len), args, total=steps_per_epoch,
                              desc=f"epoch {epoch + 1}/{args.epochs}")
        for x, y in bar:
            hidden = detach(hidden)                       # truncated BPTT: carry the state, not the graph
            logits, hidden = model(x, hidden)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            res.losses.append(loss.item())
            res.grad_norms.append(float(norm))
            total, n, step = total + res.losses[-1], n + 1, step + 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{res.losses[-1]:.3f}", grad_norm=f"{res.grad_norms[-1]:.2f}")
            if args.max_steps and step >= args.max_steps:
                break
        res.epoch_times.append(timer.stop())
        res.epoch_loss.append(total / max(n, 1))
        res.val_ppl.append(evaluate(res.model, val_stream, args))
        common.log(f"epoch {epoch + 1}: train loss {res.epoch_loss[-1]:.4f} (ppl {math.exp(res.epoch_loss[-1]):.2f})  "
                   f"val ppl {res.val_ppl[-1]:.3f}  grad norm mean {sum(res.grad_norms[-n:]) / max(n, 1):.3f}  "
                   f"{res.epoch_times[-1]:.1f}s")
        if args.max_steps and step >= args.max_steps:
            break
    if not res.val_ppl:
        res.val_ppl.append(evaluate(res.model, val_stream, args))
    return res


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)
    ckpt = common.load_checkpoint(args.load) if args.load else None
    text = load_text(args)
    common.log(f"char LM: {len(text):,} characters, {args.cell.upper()} {args.layers}x{args.hidden} "
               f"on {common.describe(args, args.cell)}, device {device}")
    res = train(args, text, chars=ckpt["chars"] if ckpt else None, state=ckpt["model"] if ckpt else None)
    baseline = (ngram_perplexity(res.train_text, res.val_text, args.ngram, len(res.chars))
                if common.is_main_process() else float("nan"))
    common.log(f"validation perplexity {res.val_ppl[-1]:.3f}  ({args.ngram}-gram Witten-Bell baseline: {baseline:.3f})")
    if common.is_main_process():
        text_out = sample(res.model, res.chars, args.prompt, args.sample_len, args.temperature, device, args.seed)
        print(f"--- sample (temperature {args.temperature}) ---\n{text_out}\n---")
        if not args.no_save:
            path = common.save_checkpoint(os.path.join(args.out, "checkpoint.pt"), res.model, args, chars=res.chars)
            print(f"checkpoint: {path}")
        if not args.no_plot and res.epoch_loss:
            epochs = list(range(1, len(res.epoch_loss) + 1))
            title = f"char LM ({common.describe(args, args.cell)})"
            png = common.plot_curves(os.path.join(args.out, "curves.png"), title, {
                "loss (nats/char)": {"train": (epochs, res.epoch_loss),
                                     "validation": (epochs, [math.log(p) for p in res.val_ppl[:len(epochs)]])},
                "validation perplexity": {args.rnn: (epochs, res.val_ppl[:len(epochs)]),
                                          f"{args.ngram}-gram": (epochs, [baseline] * len(epochs))},
                "gradient norm (per step)": {"before clipping": (
                    [i / max(len(res.grad_norms), 1) * len(epochs) for i in range(len(res.grad_norms))],
                    res.grad_norms)}})
            print(f"plot: {png}")
    line = common.final_line("char_lm", args, "val_ppl", res.val_ppl[-1], res.epoch_times,
                             extra=f"ngram{args.ngram}_ppl={baseline:.4g}")
    common.teardown()
    return res, line


if __name__ == "__main__":
    main()
