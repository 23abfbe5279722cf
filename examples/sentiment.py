"""Sentiment classifier on Rotten Tomatoes snippets (fresh / rotten):
embedding -> bidirectional 2-layer LSTM over packed variable-length batches -> linear classifier.

    python examples/sentiment.py --quick                   # ~1 min on a CPU
    python examples/sentiment.py                           # GPU-sized model
    python examples/sentiment.py --quick --rnn nn          # the same model on torch.nn.LSTM
    python examples/sentiment.py --load runs/sentiment/checkpoint.pt --epochs 0 --rnn nn   # evaluate only

The split is 80 / 10 / 10 (train / validation / test) with a fixed shuffle; the reported accuracy
is on the test split, with the weights of the epoch that did best on validation.
"""
import argparse
import copy
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import data as datasets  # noqa: E402

PAD, UNK = 0, 1


def build_parser():
    p = argparse.ArgumentParser(description="bidirectional-LSTM sentiment classifier (fused_rnn example)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--embed", type=int, default=200)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--min-freq", type=int, default=2, help="rarer training words become <unk>")
    p.add_argument("--max-len", type=int, default=80, help="truncate snippets to this many tokens")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=1,
                   help="train this many times, from --seed on, and report the mean and std of the test accuracy")
    p.add_argument("--pool", choices=["last", "max"], default="last",
                   help="snippet vector: the top layer's final states, or the maximum over time of its outputs")
    common.add_common_args(p, epochs=8, batch_size=64, lr=1e-3, out="runs/sentiment")
    return p


CPU = dict(embed=128, hidden=128, layers=1, dropout=0.5, epochs=7, lr=3e-3, max_len=60, pool="max", seeds=3,
           threads=1)
QUICK = dict(embed=64, hidden=64, dropout=0.3, epochs=3, batch_size=64, lr=4e-3, max_len=40, threads=1)


def parse_args(argv=None):
    p = build_parser()
    return common.apply_preset(p.parse_args(argv), p, {"cpu": CPU, "quick": QUICK})


def load_rows(args):
    return datasets.read_reviews(args.data_file) if args.data_file else datasets.reviews()


TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text):
    return TOKEN.findall(text.lower())


def split_rows(rows, seed=0):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = len(rows)
    a, b = int(0.8 * n), int(0.9 * n)
    return rows[:a], rows[a:b], rows[b:]


def build_vocab(rows, min_freq):
    counts = Counter(t for text, _ in rows for t in tokenize(text))
    return ["<pad>", "<unk>"] + sorted(w for w, c in counts.items() if c >= min_freq)


def encode(rows, vocab, max_len):
    index = {w: i for i, w in enumerate(vocab)}
    return [([index.get(t, UNK) for t in tokenize(text)][:max_len] or [UNK], label) for text, label in rows]


def batches(examples, batch_size, shuffle, generator=None):
    """Padded [B, T] id batches, lengths [B], labels [B]; lengths vary within a batch (packed later)."""
    order = torch.randperm(len(examples), generator=generator).tolist() if shuffle else range(len(examples))
    order = list(order)
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i:i + batch_size]]
        lengths = torch.tensor([len(ids) for ids, _ in chunk])
        x = torch.full((len(chunk), int(lengths.max())), PAD, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            x[r, :len(ids)] = torch.tensor(ids)
        yield x, lengths, torch.tensor([label for _, label in chunk])


class Classifier(nn.Module):
    def __init__(self, args, vocab_size, classes=2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, args.embed, padding_idx=PAD)
        self.drop = nn.Dropout(args.dropout)
        self.rnn = common.rnn_layer(args, "LSTM", args.embed, args.hidden, args.layers, batch_first=True,
                                    bidirectional=True, dropout=args.dropout if args.layers > 1 else 0.0)
        self.head = nn.Linear(2 * args.hidden, classes)
        self.pool = args.pool

    def forward(self, x, lengths):                       # x [B, T] padded ids, lengths [B] (CPU)
        packed = pack_padded_sequence(self.drop(self.embed(x)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, (h_n, _) = self.rnn(packed)                 # h_n [layers*2, B, H], in the batch's order
        if self.pool == "max":                           # every position votes, not only the ends
            y, _ = pad_packed_sequence(out, batch_first=True, padding_value=float("-inf"))
            vec = y.max(dim=1).values                    # [B, 2H]
        else:
            vec = torch.cat([h_n[-2], h_n[-1]], dim=-1)  # top layer: forward end, backward start
        return self.head(self.drop(vec))


@torch.no_grad()
def accuracy(model, examples, args):
    model.eval()
    correct = 0
    for x, lengths, y in batches(examples, 256, shuffle=False):
        pred = model(x.to(args.device_obj), lengths).argmax(-1).cpu()
        correct += int((pred == y).sum())
    model.train()
    return correct / max(len(examples), 1)


@dataclass
class Result:
    losses: list = field(default_factory=list)        # training loss of every optimizer step
    epoch_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    test_acc: float = float("nan")
    epoch_times: list = field(default_factory=list)
    model: nn.Module = None
    vocab: list = None


def train(args, rows, vocab=None, state=None):
    """Train on [(text, label)] rows (split 80/10/10 here) and return a Result; `losses` holds every
    step's training loss, `test_acc` the test accuracy of the best-on-validation weights."""
    device = getattr(args, "device_obj", None) or common.pick_device(args.device)
    args.device_obj = device
    common.seed_everything(args.seed)
    train_rows, val_rows, test_rows = split_rows(rows, seed=0)
    vocab = vocab or build_vocab(train_rows, args.min_freq)
    train_ex, val_ex, test_ex = (encode(r, vocab, args.max_len) for r in (train_rows, val_rows, test_rows))

    model = Classifier(args, len(vocab)).to(device)
    if state is not None:
        model.load_state_dict(state, strict=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    res = Result(model=model, vocab=vocab)
    best, best_state = -1.0, None
    gen = torch.Generator().manual_seed(args.seed)
    timer = common.EpochTimer(device)
    step = 0
    n_batches = (len(train_ex) + args.batch_size - 1) // args.batch_size
    sched = common.lr_scheduler(opt, args, n_batches)
    for epoch in range(args.epochs):
        timer.start()
        total, n = 0.0, 0
        bar = common.progress(batches(train_ex, args.batch_size, True, gen), args, total=n_batches,
                              desc=f"epoch {epoch + 1}/{args.epochs}")
        for x, lengths, y in bar:
            loss = F.cross_entropy(model(x.to(device), lengths), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            res.losses.append(loss.item())
            total, n, step = total + res.losses[-1], n + 1, step + 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{res.losses[-1]:.3f}")
            if args.max_steps and step >= args.max_steps:
                break
        res.epoch_times.append(timer.stop())
        res.epoch_loss.append(total / max(n, 1))
        res.val_acc.append(accuracy(model, val_ex, args))
        if res.val_acc[-1] > best:
            best, best_state = res.val_acc[-1], copy.deepcopy(model.state_dict())
        common.log(f"epoch {epoch + 1}: train loss {res.epoch_loss[-1]:.4f}  val acc {res.val_acc[-1]:.4f}  "
                   f"{res.epoch_times[-1]:.1f}s")
        if args.max_steps and step >= args.max_steps:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    res.test_acc = accuracy(model, test_ex, args)
    return res


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)
    ckpt = common.load_checkpoint(args.load) if args.load else None
    rows = load_rows(args)
    common.log(f"sentiment: {len(rows):,} labelled snippets ({sum(l for _, l in rows):,} positive), "
               f"biLSTM {args.layers}x{args.hidden} on {common.describe(args)}, device {device}")
    seeds = [args.seed + i for i in range(1 if ckpt else args.seeds)]
    runs = []
    for seed in seeds:                       # the same split every time; the seed draws weights, order, dropout
        args.seed = seed
        runs.append(train(args, rows, vocab=ckpt["vocab"] if ckpt else None, state=ckpt["model"] if ckpt else None))
        common.log(f"seed {seed}: test accuracy {runs[-1].test_acc:.4f}")
    args.seed = seeds[0]
    res = runs[0]
    accs = torch.tensor([r.test_acc for r in runs], dtype=torch.float64)
    mean, std = float(accs.mean()), float(accs.std()) if len(runs) > 1 else 0.0
    test_labels = [label for _, label in split_rows(rows)[2]]
    majority = max(sum(test_labels), len(test_labels) - sum(test_labels)) / max(len(test_labels), 1)
    common.log(f"test accuracy {mean:.4f} ± {std:.4f} over seeds {seeds}  (majority class: {majority:.4f})")
    if not args.no_save:
        path = common.save_checkpoint(os.path.join(args.out, "checkpoint.pt"), res.model, args, vocab=res.vocab)
        print(f"checkpoint: {path} (seed {seeds[0]})")
    if not args.no_plot and res.epoch_loss:
        png = common.plot_curves(os.path.join(args.out, "curves.png"), f"sentiment ({common.describe(args)})", {
            "training loss": {f"seed {s}": (list(range(1, len(r.epoch_loss) + 1)), r.epoch_loss)
                              for s, r in zip(seeds, runs)},
            "validation accuracy": {
                f"seed {s}, test {r.test_acc:.3f}": (list(range(1, len(r.val_acc) + 1)), r.val_acc)
                for s, r in zip(seeds, runs)}})
        print(f"plot: {png}")
    line = common.final_line("sentiment", args, "test_acc", mean, [t for r in runs for t in r.epoch_times],
                             extra=f"test_acc_std={std:.3g} seeds={len(seeds)} "
                                   f"per_seed={','.join(f'{r.test_acc:.4f}' for r in runs)}")
    return res, line


if __name__ == "__main__":
    main()
