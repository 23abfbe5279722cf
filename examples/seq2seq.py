"""German -> English translation: bidirectional GRU (or LSTM) encoder, decoder with additive
(Bahdanau) attention, teacher forcing, greedy and beam-search decoding, BLEU with sacrebleu.

    python examples/seq2seq.py --quick                     # short sentences, small model: ~1 min on a CPU
    python examples/seq2seq.py                             # GPU-sized model, sentences up to 25 tokens
    python examples/seq2seq.py --quick --rnn nn --cell lstm
    python examples/seq2seq.py --load runs/seq2seq/checkpoint.pt --epochs 0 --rnn nn   # decode + BLEU only

Data: whole-sentence pairs from Frank Richter's German-English dictionary (Debian trans-de-en),
split 90 / 5 / 5 (train / validation / test) with a fixed shuffle. Text is lowercased and cut into
words (--tokenizer word) or into sentencepiece subword units trained on the training split, one
model per language (--tokenizer spm). BLEU is sacrebleu's corpus BLEU (its default 13a
tokenisation) of the detokenized hypotheses on the test split against the lowercased references.
"""
import argparse
import io
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import data as datasets  # noqa: E402

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def build_parser():
    p = argparse.ArgumentParser(description="seq2seq translator with attention (fused_rnn example)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    p.add_argument("--embed", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512, help="encoder hidden size per direction and decoder size")
    p.add_argument("--layers", type=int, default=2, help="encoder layers")
    p.add_argument("--attn", type=int, default=256, help="attention size")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--max-len", type=int, default=25, help="keep pairs with at most this many words a side")
    p.add_argument("--tokenizer", choices=["word", "spm"], default="word",
                   help="units the model reads and writes: lowercased words, or sentencepiece subwords")
    p.add_argument("--vocab-size", type=int, default=4000, help="sentencepiece vocabulary per language")
    p.add_argument("--spm-type", choices=["unigram", "bpe"], default="unigram", help="sentencepiece model type")
    p.add_argument("--min-freq", type=int, default=2, help="rarer training units become <unk>")
    p.add_argument("--teacher-forcing", type=float, default=1.0,
                   help="probability of feeding the reference token (else the model's own) at each step")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=0, help="translate at most this many test sentences (0: all)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--tie-embeddings", action="store_true",
                   help="read out through a tanh layer of --embed units and score words with the target "
                        "embedding matrix (tied weights: fewer parameters, faster output layer)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="of the training loss")
    p.add_argument("--dict-pairs", type=int, default=0,
                   help="add this many of the dictionary's word and phrase entries (drawn anew every epoch) "
                        "to the training sentences; never with --data-file")
    p.add_argument("--word-dropout", type=float, default=0.0,
                   help="probability of replacing a training source unit by <unk> (Sennrich & Zhang 2019)")
    common.add_common_args(p, epochs=20, batch_size=128, lr=1e-3, out="runs/seq2seq")
    return p


CPU = dict(embed=128, hidden=256, layers=1, attn=128, dropout=0.2, max_len=15, epochs=8, batch_size=64, lr=3e-3,
           lr_schedule="cosine", tokenizer="spm", vocab_size=2000, tie_embeddings=True, beam=5, threads=1)
QUICK = dict(embed=64, hidden=128, layers=1, attn=64, dropout=0.2, max_len=8, epochs=4, batch_size=64,
             lr=3e-3, beam=4, eval_size=400, threads=1)


def parse_args(argv=None):
    p = build_parser()
    return common.apply_preset(p.parse_args(argv), p, {"cpu": CPU, "quick": QUICK})


def load_pairs(args):
    return datasets.read_pairs(args.data_file) if args.data_file else datasets.de_en_pairs()


def load_phrases(args):
    return [] if args.data_file or not args.dict_pairs or not args.epochs else datasets.de_en_phrases()


def phrase_pool(phrases, train_pairs, held_out, max_len):
    """The word/phrase pairs whose German words all occur in the German training sentences (the
    dictionary's meanings of the words the sentences use, not its thousands of bird names), with at
    most max_len words a side, and whose sides differ from every side of the held-out (validation
    and test) sentence pairs, compared without case and punctuation."""
    words = lambda s: [w for w in tokenize(s) if w[0].isalnum()]     # noqa: E731
    known = {w for d, _ in train_pairs for w in words(d)}
    banned = {" ".join(words(s)) for pair in held_out for s in pair}
    return [(d, e) for d, e in prepare(phrases, max_len)
            if all(w in known for w in words(d)) and " ".join(words(d)) not in banned
            and " ".join(words(e)) not in banned]


TOKEN = re.compile(r"\w+(?:'\w+)?|[^\s\w]")


def normalize(s):
    return s.lower().replace("’", "'")


def tokenize(s):
    return TOKEN.findall(normalize(s))


def detokenize(tokens):
    s = " ".join(tokens)
    s = re.sub(r" ([.,!?;:%)])", r"\1", s)
    return re.sub(r"([(]) ", r"\1", s)


class WordTokenizer:
    """Lowercased words and punctuation marks; decode joins them back into text."""
    kind = "word"

    def encode(self, text):
        return tokenize(text)

    def decode(self, tokens):
        return detokenize(tokens)


class SubwordTokenizer:
    """A sentencepiece model (unigram or BPE) over lowercased text: rare words become several
    frequent pieces instead of <unk>, and decode restores the text exactly."""
    kind = "spm"

    def __init__(self, proto: bytes):
        import sentencepiece as spm
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)

    @classmethod
    def train(cls, texts, vocab_size, model_type="unigram"):
        import sentencepiece as spm
        texts = [normalize(t) for t in texts]
        buf = io.BytesIO()
        # hard_vocab_limit off: a small corpus may support fewer pieces than asked for
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                                       model_type=model_type, character_coverage=1.0, hard_vocab_limit=False,
                                       bos_id=-1, eos_id=-1, num_threads=1, minloglevel=2)
        return cls(buf.getvalue())

    def encode(self, text):
        return self.sp.encode(normalize(text), out_type=str)

    def decode(self, pieces):
        return self.sp.decode_pieces(list(pieces))


def make_tokenizers(args, train_pairs):
    if args.tokenizer == "word":
        return WordTokenizer(), WordTokenizer()
    return tuple(SubwordTokenizer.train([p[side] for p in train_pairs], args.vocab_size, args.spm_type)
                 for side in (0, 1))


def tokenizer_state(tok):
    """What a checkpoint keeps of a tokenizer: nothing for words, the sentencepiece model as bytes."""
    return None if tok.kind == "word" else torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8)


def tokenizer_from_state(state):
    return WordTokenizer() if state is None else SubwordTokenizer(bytes(state.numpy().tobytes()))


def prepare(pairs, max_len):
    """The pairs with 1 to max_len words a side (the same pairs whatever the tokenizer)."""
    return [(de, en) for de, en in pairs if 1 <= len(tokenize(de)) <= max_len and 1 <= len(tokenize(en)) <= max_len]


def split(items, seed=0):
    items = list(items)
    random.Random(seed).shuffle(items)
    n = len(items)
    a, b = int(0.9 * n), int(0.95 * n)
    return items[:a], items[a:b], items[b:]


def build_vocab(seqs, min_freq):
    from collections import Counter
    counts = Counter(t for s in seqs for t in s)
    return SPECIALS + sorted(w for w, c in counts.items() if c >= min_freq)


def ids(tokens, index):
    return [index.get(t, UNK) for t in tokens]


def pad(seqs):
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.full((len(seqs), int(lengths.max())), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x, lengths


class Seq2Seq(nn.Module):
    def __init__(self, args, src_vocab, tgt_vocab):
        super().__init__()
        self.is_lstm = args.cell == "lstm"
        kind = args.cell.upper()
        E, H, A = args.embed, args.hidden, args.attn
        self.src_embed = nn.Embedding(src_vocab, E, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(tgt_vocab, E, padding_idx=PAD)
        self.drop = nn.Dropout(args.dropout)
        self.encoder = common.rnn_layer(args, kind, E, H, args.layers, batch_first=True, bidirectional=True,
                                        dropout=args.dropout if args.layers > 1 else 0.0)
        self.decoder = common.rnn_layer(args, kind + "Cell", E + 2 * H, H)
        self.init_h = nn.Linear(2 * H, H)
        self.init_c = nn.Linear(2 * H, H) if self.is_lstm else None
        self.attn_s = nn.Linear(H, A, bias=False)       # e_tj = v . tanh(W s_{t-1} + U h_j)
        self.attn_h = nn.Linear(2 * H, A)
        self.attn_v = nn.Linear(A, 1, bias=False)
        if args.tie_embeddings:                         # readout from s_t, context_t, y_{t-1}
            self.readout = nn.Sequential(nn.Linear(H + 2 * H + E, E), nn.Tanh())
            self.out = nn.Linear(E, tgt_vocab)
            self.out.weight = self.tgt_embed.weight
        else:
            self.readout = nn.Identity()
            self.out = nn.Linear(H + 2 * H + E, tgt_vocab)

    def encode(self, src, lengths):
        packed = pack_padded_sequence(self.drop(self.src_embed(src)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, hidden = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))   # [B, S, 2H]
        h_n, c_n = hidden if self.is_lstm else (hidden, None)
        h0 = torch.tanh(self.init_h(torch.cat([h_n[-2], h_n[-1]], -1)))
        state = (h0, torch.tanh(self.init_c(torch.cat([c_n[-2], c_n[-1]], -1)))) if self.is_lstm else h0
        return out, self.attn_h(out), src != PAD, state

    def step(self, prev, state, enc_out, enc_proj, mask):
        """One decoder step: attend with the previous state, update the state, read out logits."""
        s = state[0] if self.is_lstm else state
        scores = self.attn_v(torch.tanh(enc_proj + self.attn_s(s).unsqueeze(1))).squeeze(-1)    # [B, S]
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        context = torch.bmm(weights.unsqueeze(1), enc_out).squeeze(1)                           # [B, 2H]
        emb = self.drop(self.tgt_embed(prev))
        state = self.decoder(torch.cat([emb, context], -1), state)
        s = state[0] if self.is_lstm else state
        return self.out(self.drop(self.readout(torch.cat([s, context, emb], -1)))), state, weights

    def forward(self, src, lengths, tgt_in, teacher_forcing=1.0, generator=None):
        """Logits [B, T, V] for decoder inputs tgt_in [B, T] (starting with <bos>)."""
        enc_out, enc_proj, mask, state = self.encode(src, lengths)
        prev, logits = tgt_in[:, 0], []
        for t in range(tgt_in.size(1)):
            out, state, _ = self.step(prev, state, enc_out, enc_proj, mask)
            logits.append(out)
            if t + 1 < tgt_in.size(1):
                prev = tgt_in[:, t + 1]
                if teacher_forcing < 1.0:
                    own = torch.rand(prev.shape, generator=generator) >= teacher_forcing
                    prev = torch.where(own.to(prev.device) & (prev != PAD), out.argmax(-1), prev)
        return torch.stack(logits, 1)


def select_state(state, idx):
    return tuple(s[idx] for s in state) if isinstance(state, tuple) else state[idx]


@torch.no_grad()
def greedy(model, src, lengths, max_len):
    """Batched greedy decoding: token lists and the attention weights [B, T, S]."""
    enc_out, enc_proj, mask, state = model.encode(src, lengths)
    prev = torch.full((src.size(0),), BOS, dtype=torch.long, device=src.device)
    tokens, attns = [], []
    done = torch.zeros_like(prev, dtype=torch.bool)
    for _ in range(max_len):
        logits, state, w = model.step(prev, state, enc_out, enc_proj, mask)
        prev = logits.argmax(-1)
        tokens.append(prev)
        attns.append(w)
        done |= prev == EOS
        if bool(done.all()):
            break
    tokens, attns = torch.stack(tokens, 1).tolist(), torch.stack(attns, 1)
    return [t[:t.index(EOS)] if EOS in t else t for t in tokens], attns


@torch.no_grad()
def beam_search(model, src, length, beam, max_len, alpha=0.6):
    """One sentence (src [1, S]); the beam is the batch. GNMT length penalty ((5+n)/6)^alpha."""
    enc_out, enc_proj, mask, state = model.encode(src, length)
    seqs = torch.full((1, 1), BOS, dtype=torch.long, device=src.device)
    scores = torch.zeros(1, device=src.device)
    finished = []
    for t in range(max_len):
        n = seqs.size(0)
        logits, state, _ = model.step(seqs[:, -1], state, enc_out.expand(n, -1, -1), enc_proj.expand(n, -1, -1),
                                      mask.expand(n, -1))
        cand = (scores.unsqueeze(1) + F.log_softmax(logits.float(), -1)).view(-1)
        top_scores, top = cand.topk(min(2 * beam, cand.numel()))
        keep_rows, keep_tok, keep_scores = [], [], []
        V = logits.size(-1)
        for sc, k in zip(top_scores.tolist(), top.tolist()):
            row, tok = divmod(k, V)
            if tok == EOS:
                finished.append((sc / ((5 + t + 1) / 6) ** alpha, seqs[row, 1:].tolist()))
            else:
                keep_rows.append(row), keep_tok.append(tok), keep_scores.append(sc)
            if len(keep_rows) == beam:
                break
        if len(finished) >= beam or not keep_rows:
            break
        rows = torch.tensor(keep_rows, device=src.device)
        seqs = torch.cat([seqs[rows], torch.tensor(keep_tok, device=src.device).unsqueeze(1)], 1)
        scores = torch.tensor(keep_scores, device=src.device)
        state = select_state(state, rows)
    if not finished:
        penalty = ((5 + seqs.size(1) - 1) / 6) ** alpha
        finished = [(sc / penalty, s[1:]) for sc, s in zip(scores.tolist(), seqs.tolist())]
    return max(finished, key=lambda f: f[0])[1]


def bleu(hyps, refs):
    import sacrebleu
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def translate(model, items, src_index, tgt_vocab, tgt_tok, args, beam=0):
    """Detokenized translations of items [(src tokens, tgt tokens, reference)], greedy (batches of
    256 sentences) or beam search (one sentence at a time, the beam is the batch)."""
    model.eval()
    dev, out = args.device_obj, []
    if beam:
        for src_toks, _, _ in items:
            src, lengths = pad([ids(src_toks, src_index)])
            out.append(beam_search(model, src.to(dev), lengths, beam, args.decode_len))
    else:
        for i in range(0, len(items), 256):
            src, lengths = pad([ids(s, src_index) for s, _, _ in items[i:i + 256]])
            out += greedy(model, src.to(dev), lengths, args.decode_len)[0]
    model.train()
    return [tgt_tok.decode([tgt_vocab[t] for t in seq]) for seq in out]


def timed_translate(model, items, src_index, tgt_vocab, tgt_tok, args, beam=0):
    """translate() and its speed in sentences per second (CUDA synchronised)."""
    sync = torch.cuda.synchronize if args.device_obj.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    hyps = translate(model, items, src_index, tgt_vocab, tgt_tok, args, beam)
    sync()
    return hyps, len(items) / max(time.perf_counter() - t0, 1e-9)


def batches(examples, batch_size, shuffle, generator=None, pool=50):
    """Padded (src, lengths, tgt) batches. Shuffled: random pools of `pool` batches, each sorted by
    length and cut into batches served in random order, so that a batch wastes little on padding."""
    if not shuffle:
        order = [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
    else:
        perm, order = torch.randperm(len(examples), generator=generator).tolist(), []
        for i in range(0, len(perm), pool * batch_size):
            part = sorted(perm[i:i + pool * batch_size], key=lambda j: len(examples[j][0]) + len(examples[j][1]))
            order += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
        order = [order[k] for k in torch.randperm(len(order), generator=generator).tolist()]
    for rows in order:
        chunk = [examples[j] for j in rows]
        src, lengths = pad([s for s, _ in chunk])
        tgt, _ = pad([[BOS] + t + [EOS] for _, t in chunk])
        yield src, lengths, tgt


def batch_loss(model, batch, device, teacher_forcing=1.0, generator=None, label_smoothing=0.0):
    src, lengths, tgt = batch
    src, tgt = src.to(device), tgt.to(device)
    logits = model(src, lengths, tgt[:, :-1], teacher_forcing, generator)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1), ignore_index=PAD,
                           label_smoothing=label_smoothing)


def drop_words(src, p, generator):
    """src [B, S] with each unit (not padding) replaced by <unk> with probability p: word dropout."""
    drop = (torch.rand(src.shape, generator=generator) < p) & (src != PAD)
    return src.masked_fill(drop, UNK)


@dataclass
class Result:
    losses: list = field(default_factory=list)     # training loss of every optimizer step
    epoch_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_bleu: list = field(default_factory=list)   # greedy BLEU on the validation split, every epoch
    epoch_times: list = field(default_factory=list)
    model: nn.Module = None
    src_vocab: list = None
    tgt_vocab: list = None
    src_tok: object = None
    tgt_tok: object = None
    test: list = None                              # [(src tokens, tgt tokens, reference)]
    test_sources: list = None                      # the German sentences of `test`


def train(args, pairs, vocabs=None, state=None, tokenizers=None, phrases=()):
    """Train on [(german, english)] pairs (split 90/5/5 here), plus --dict-pairs of the word/phrase
    pairs `phrases` every epoch, and return a Result; `losses` holds every step's training loss."""
    device = getattr(args, "device_obj", None) or common.pick_device(args.device)
    args.device_obj = device
    common.seed_everything(args.seed)
    train_pairs, val_pairs, test_pairs = split(prepare(pairs, args.max_len), seed=0)
    if not train_pairs:
        raise SystemExit(f"no sentence pairs with at most {args.max_len} words a side")
    pool = phrase_pool(phrases, train_pairs, val_pairs + test_pairs, args.max_len) if args.dict_pairs else []
    src_tok, tgt_tok = tokenizers or make_tokenizers(args, train_pairs + pool)
    train_items, val_items, test_items, pool_items = ([(src_tok.encode(d), tgt_tok.encode(e), e) for d, e in ps]
                                                      for ps in (train_pairs, val_pairs, test_pairs, pool))
    args.decode_len = max(len(t) for _, t, _ in train_items) + 2     # longest training target, and <eos>
    src_vocab, tgt_vocab = vocabs or (build_vocab([s for s, _, _ in train_items + pool_items], args.min_freq),
                                      build_vocab([t for _, t, _ in train_items + pool_items], args.min_freq))
    si, ti = ({w: i for i, w in enumerate(v)} for v in (src_vocab, tgt_vocab))
    encode = lambda items: [(ids(s, si), ids(t, ti)) for s, t, _ in items]  # noqa: E731
    train_ex, val_ex, pool_ex = encode(train_items), encode(val_items), encode(pool_items)
    n_extra = min(args.dict_pairs, len(pool_ex))
    if pool:
        common.log(f"training pairs: {len(train_ex):,} sentences + {n_extra:,} a epoch drawn from "
                   f"{len(pool_ex):,} dictionary words and phrases")

    model = Seq2Seq(args, len(src_vocab), len(tgt_vocab)).to(device)
    if state is not None:
        model.load_state_dict(state, strict=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    res = Result(model=model, src_vocab=src_vocab, tgt_vocab=tgt_vocab, src_tok=src_tok, tgt_tok=tgt_tok,
                 test=test_items, test_sources=[d for d, _ in test_pairs])
    gen = torch.Generator().manual_seed(args.seed)
    tf_gen = torch.Generator().manual_seed(args.seed + 1)
    wd_gen = torch.Generator().manual_seed(args.seed + 2)
    timer = common.EpochTimer(device)
    step = 0
    n_batches = (len(train_ex) + n_extra + args.batch_size - 1) // args.batch_size
    val_subset = val_items[:args.eval_size] if args.eval_size else val_items
    sched = common.lr_scheduler(opt, args, n_batches)
    for epoch in range(args.epochs):
        timer.start()
        total, n = 0.0, 0
        extra = [pool_ex[i] for i in torch.randperm(len(pool_ex), generator=gen)[:n_extra].tolist()]
        bar = common.progress(batches(train_ex + extra, args.batch_size, True, gen), args, total=n_batches,
                              desc=f"epoch {epoch + 1}/{args.epochs}")
        for batch in bar:
            if args.word_dropout:
                batch = (drop_words(batch[0], args.word_dropout, wd_gen), *batch[1:])
            loss = batch_loss(model, batch, device, args.teacher_forcing, tf_gen, args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
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
        model.eval()
        with torch.no_grad():
            vl = [(batch_loss(model, b, device).item(), b[0].size(0)) for b in batches(val_ex, 256, False)]
        model.train()
        res.val_loss.append(sum(l * k for l, k in vl) / max(sum(k for _, k in vl), 1))
        res.val_bleu.append(bleu(translate(model, val_subset, si, tgt_vocab, tgt_tok, args),
                                 [r.lower() for _, _, r in val_subset]))
        common.log(f"epoch {epoch + 1}: train loss {res.epoch_loss[-1]:.4f}  val loss {res.val_loss[-1]:.4f}  "
                   f"val BLEU (greedy) {res.val_bleu[-1]:.2f}  {res.epoch_times[-1]:.1f}s")
        if args.max_steps and step >= args.max_steps:
            break
    return res


def plot_attention(path, src_tokens, out_tokens, weights):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(src_tokens), 1 + 0.4 * len(out_tokens)))
    ax.imshow(weights, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=60, ha="right")
    ax.set_yticks(range(len(out_tokens)), out_tokens)
    ax.set_xlabel("German (source)")
    ax.set_ylabel("English (greedy output)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    device = common.setup(args)
    ckpt = common.load_checkpoint(args.load) if args.load else None
    pairs = load_pairs(args)
    common.log(f"seq2seq: {len(pairs):,} sentence pairs, {args.cell.upper()} encoder {args.layers}x{args.hidden} "
               f"(bidirectional) + attention decoder on {common.describe(args, args.cell)}, device {device}")
    tokenizers = (tuple(tokenizer_from_state(ckpt[k]) for k in ("src_spm", "tgt_spm")) if ckpt else None)
    res = train(args, pairs, vocabs=(ckpt["src_vocab"], ckpt["tgt_vocab"]) if ckpt else None,
                state=ckpt["model"] if ckpt else None, tokenizers=tokenizers, phrases=load_phrases(args))
    model, si = res.model, {w: i for i, w in enumerate(res.src_vocab)}
    test = res.test[:args.eval_size] if args.eval_size else res.test
    refs = [r.lower() for _, _, r in test]
    greedy_hyps, greedy_speed = timed_translate(model, test, si, res.tgt_vocab, res.tgt_tok, args)
    hyps, beam_speed = timed_translate(model, test, si, res.tgt_vocab, res.tgt_tok, args, beam=args.beam)
    greedy_bleu, beam_bleu = bleu(greedy_hyps, refs), bleu(hyps, refs)
    common.log(f"test BLEU on {len(test)} sentences: greedy {greedy_bleu:.2f}, beam {args.beam} {beam_bleu:.2f}")
    common.log(f"decoding speed ({common.describe(args, args.cell)} {args.cell.upper()}Cell steps): "
               f"greedy {greedy_speed:.1f} sentences/s (batches of 256), beam {args.beam} {beam_speed:.1f} sentences/s")
    samples = [f"DE  {src}\nREF {r.lower()}\nOUT {h}\n" for (_, _, r), h, src in
               zip(test, hyps, res.test_sources)]
    common.log("\n".join(samples[:5]))
    if not args.no_save:
        path = common.save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, args,
                                      src_vocab=res.src_vocab, tgt_vocab=res.tgt_vocab,
                                      src_spm=tokenizer_state(res.src_tok), tgt_spm=tokenizer_state(res.tgt_tok))
        print(f"checkpoint: {path}")
        with open(os.path.join(args.out, "translations.txt"), "w", encoding="utf-8") as f:
            f.write(f"# test split, beam {args.beam}: German source, lowercased English reference, output\n\n"
                    + "\n".join(samples))
    if not args.no_plot:
        epochs = list(range(1, len(res.epoch_loss) + 1))
        if epochs:
            title = f"seq2seq ({common.describe(args, args.cell)})"
            png = common.plot_curves(os.path.join(args.out, "curves.png"), title, {
                "loss": {"train": (epochs, res.epoch_loss), "validation": (epochs, res.val_loss)},
                "BLEU": {"validation (greedy)": (epochs, res.val_bleu),
                         f"test (beam {args.beam})": ([epochs[-1]], [beam_bleu])}})
            print(f"plot: {png}")
        src_toks = test[0][0]
        src, lengths = pad([ids(src_toks, si)])
        model.eval()
        out, attn = greedy(model, src.to(device), lengths, args.decode_len)
        out_toks = [res.tgt_vocab[t] for t in out[0]] + ["<eos>"]
        png = plot_attention(os.path.join(args.out, "attention.png"), src_toks, out_toks,
                             attn[0, :len(out_toks), :len(src_toks)].float().cpu().numpy())
        print(f"attention plot: {png}")
    line = common.final_line("seq2seq", args, "test_bleu", beam_bleu, res.epoch_times,
                             extra=f"greedy_bleu={greedy_bleu:.4g} greedy_sent/s={greedy_speed:.4g} "
                                   f"beam_sent/s={beam_speed:.4g}")
    return res, line


if __name__ == "__main__":
    main()
