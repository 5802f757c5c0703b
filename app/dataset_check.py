"""Whether a folder of files is a usable dataset: the layout, the pairing of images with masks, each
pair's pixels, the minimum number of pairs, the optional ``pairs.csv`` groups, and the fingerprint.

Pure (no torch, no Redis, no storage): the API runs ``check_folder`` on an unpacked upload
(``app.archive``), the CLI's ``models.data.find_pairs`` pairs its folders with ``match_pairs``, and
both fingerprint with ``fingerprint``. Every problem found is collected as an ``Issue`` naming the
file, so one answer lists all that is wrong, not the first thing only.

The layout: ``images/NAME.ext`` + ``masks/NAME.ext`` (NAME the same, the formats of ``app.pixels``,
which may differ between an image and its mask), optionally ``pairs.csv`` (columns ``name`` and,
for a group-aware split, ``group``) and the notes that travel with the data (``NOTE_FILES``).
Images without masks are explicit: ``unlabelled/NAME.ext`` (checked like images; Stage I learns
appearance from them). An image in ``images/`` without its mask stays an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.pixels import FileCheck, PixelsError, check_file, split_suffix

PAIRS_CSV = "pairs.csv"
UNLABELLED = "unlabelled"  # images without masks (models.data.UNLABELLED_DIR)
NOTE_FILES = ("SOURCE.md", "LICENSE", "LICENSE.md", "LICENSE.txt", "README.md", "README.txt")
MAX_ISSUES = 100  # listed in one answer; the count says how many more there were
DECODE_BYTES = 100 << 20  # the memory one file may take while it is checked (DIFFEXP_DECODE_MEMORY_MB)


@dataclass(frozen=True)
class Issue:
    """One problem: its kind (the problem's ``type`` in the API), the file at fault, what is wrong."""

    kind: str
    member: str | None
    detail: str


class DatasetInvalid(ValueError):
    """The upload is not a usable dataset; ``issues`` names each problem (at most MAX_ISSUES)."""

    def __init__(self, issues: Sequence[Issue], total: int | None = None) -> None:
        self.issues = list(issues)[:MAX_ISSUES]
        self.total = max(total or 0, len(issues))
        super().__init__(self.summary())

    def summary(self) -> str:
        shown = [f"{i.member}: {i.detail}" if i.member else i.detail for i in self.issues[:5]]
        more = self.total - len(shown)
        head = f"{self.total} problem{'s' if self.total != 1 else ''}: " if self.total > 1 else ""
        return head + "; ".join(shown) + (f"; and {more} more (see errors)" if more > 0 else "")


def fail(kind: str, detail: str, member: str | None = None) -> DatasetInvalid:
    return DatasetInvalid([Issue(kind, member, detail)])


# ---- names and pairing


def index_names(folder: str, filenames: Iterable[str]) -> tuple[dict[str, str], list[Issue]]:
    """``{NAME: file name}`` of one folder's files, with an issue per unsupported format or NAME
    shared by two files."""
    found: dict[str, str] = {}
    issues = []
    for filename in sorted(filenames):
        parts = split_suffix(filename)
        if parts is None:
            issues.append(
                Issue(
                    "unsupported_format",
                    f"{folder}/{filename}",
                    "not a supported image format (.png .jpg .jpeg .tif .tiff .bmp .dcm .nii .nii.gz)",
                )
            )
            continue
        name = parts[0]
        if name in found:
            issues.append(
                Issue("duplicate_name", f"{folder}/{filename}", f"two files named {name!r} ({found[name]})")
            )
            continue
        found[name] = filename
    return found, issues


def match_pairs(
    images: dict[str, str], masks: dict[str, str]
) -> tuple[list[tuple[str, str, str]], list[Issue]]:
    """``[(NAME, image file, mask file)]`` in NAME order, and an issue for every image without a
    mask and every mask without an image (both are errors: a dropped file is a silent data loss)."""
    pairs = [(n, images[n], masks[n]) for n in sorted(images) if n in masks]
    issues = [
        Issue(
            "image_without_mask",
            f"images/{images[n]}",
            f"image without a mask (missing mask: no masks/{n}.*)",
        )
        for n in sorted(images)
        if n not in masks
    ]
    issues += [
        Issue(
            "mask_without_image", f"masks/{masks[n]}", f"mask without an image (orphan mask: no images/{n}.*)"
        )
        for n in sorted(masks)
        if n not in images
    ]
    return pairs, issues


def common_folder(members: Sequence[str]) -> str:
    """The one folder that wraps everything (``data/images/...`` from zipping a folder), or ""."""
    firsts = {m.split("/", 1)[0] for m in members}
    if len(firsts) == 1 and all("/" in m for m in members):
        (top,) = firsts
        if top not in ("images", "masks", UNLABELLED):
            return top + "/"
    return ""


# ---- groups


def read_groups(text: str, names: Sequence[str], column: str = "group") -> dict[str, str]:
    """Group of each pair from pairs.csv's ``name`` and ``column`` columns (empty: its own group).
    Raises ``ValueError`` naming the missing columns or the pairs without a row."""
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    if "name" not in fields or column not in fields:
        raise ValueError(f"needs the columns 'name' and '{column}' to group pairs (has: {', '.join(fields)})")
    table = {(row.get("name") or "").strip(): (row.get(column) or "").strip() for row in reader}
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"no row for {len(missing)} pairs ({', '.join(missing[:5])})")
    return {n: table[n] or n for n in names}


def csv_header(text: str) -> list[str]:
    return next(csv.reader(io.StringIO(text)), [])


# ---- the fingerprint


def fingerprint(pairs: Iterable[tuple[str, Path, Path]]) -> str:
    """sha256 over every pair's name and file bytes: the same content gives the same value, so a
    dataset uploaded and one trained on from a folder are recognised as the same data."""
    h = hashlib.sha256()
    for name, ip, mp in sorted(pairs):
        h.update(name.encode())
        h.update(_file_digest(ip))
        h.update(_file_digest(mp))
    return "sha256:" + h.hexdigest()


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


# ---- the whole folder


@dataclass(frozen=True)
class Pair:
    name: str
    image: str  # file name in images/
    mask: str  # file name in masks/
    width: int
    height: int


@dataclass
class CheckedDataset:
    """A dataset that passed every check: its pairs, groups (from pairs.csv), the notes beside it and
    its unlabelled images (file names in ``unlabelled/``)."""

    pairs: list[Pair]
    fingerprint: str
    groups: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)  # pairs.csv and NOTE_FILES present at the top
    unlabelled: list[str] = field(default_factory=list)

    def sizes(self) -> list[dict[str, int]]:
        """``[{width, height, pairs}]``, one entry per image size, most common first."""
        counts: dict[tuple[int, int], int] = {}
        for p in self.pairs:
            counts[(p.width, p.height)] = counts.get((p.width, p.height), 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [{"width": w, "height": h, "pairs": n} for (w, h), n in ranked]


def check_folder(
    root: Path, members: Sequence[str], *, max_pixels: int, min_pairs: int, max_bytes: int = DECODE_BYTES
) -> CheckedDataset:
    """Check the files ``members`` (paths relative to ``root``); raises ``DatasetInvalid`` listing
    every problem: files outside the layout, orphans, unreadable or oversized images, size
    mismatches, masks that are not label maps, a bad pairs.csv, too few pairs. One file is decoded
    at a time, in at most about ``max_bytes`` of memory (``app.pixels.check_file``)."""
    issues: list[Issue] = []
    in_folder: dict[str, list[str]] = {"images": [], "masks": [], UNLABELLED: []}
    notes = []
    for member in members:
        folder, _, filename = member.partition("/")
        if folder in in_folder and filename and "/" not in filename:
            in_folder[folder].append(filename)
        elif member == PAIRS_CSV or member in NOTE_FILES:
            notes.append(member)
        else:
            issues.append(
                Issue(
                    "unexpected_member",
                    member,
                    "outside the layout: images/NAME.ext, masks/NAME.ext, unlabelled/NAME.ext, pairs.csv, "
                    + ", ".join(NOTE_FILES),
                )
            )
    images, bad = index_names("images", in_folder["images"])
    issues += bad
    masks, bad = index_names("masks", in_folder["masks"])
    issues += bad
    matched, bad = match_pairs(images, masks)
    issues += bad
    unlabelled, bad = index_names(UNLABELLED, in_folder[UNLABELLED])
    issues += bad
    for name, filename in sorted(unlabelled.items()):
        if name in images:
            issues.append(
                Issue(
                    "duplicate_name",
                    f"{UNLABELLED}/{filename}",
                    f"also a labelled pair (images/{images[name]}); an image is labelled or unlabelled",
                )
            )
            continue
        issues += check_unlabelled(root, filename, max_pixels, max_bytes)
    pairs = []
    for name, image, mask in matched:
        pair, bad = check_pair(root, name, image, mask, max_pixels, max_bytes)
        issues += bad
        if pair is not None:
            pairs.append(pair)
    groups = None
    if PAIRS_CSV in notes:
        groups, bad = _groups(root / PAIRS_CSV, [p[0] for p in matched])
        issues += bad
    if len(matched) < min_pairs:
        issues.append(
            Issue(
                "too_few_pairs",
                None,
                f"{len(matched)} image/mask pairs; at least {min_pairs} are needed (DIFFEXP_MIN_DATASET_PAIRS)"
                + ("" if matched else ": put images/NAME.ext and masks/NAME.ext at the top of the archive"),
            )
        )
    if issues:
        raise DatasetInvalid(issues, total=len(issues))
    files = [(p.name, root / "images" / p.image, root / "masks" / p.mask) for p in pairs]
    return CheckedDataset(
        pairs=pairs,
        fingerprint=fingerprint(files),
        groups=groups,
        notes=sorted(notes),
        unlabelled=[unlabelled[n] for n in sorted(unlabelled)],
    )


def check_unlabelled(
    root: Path, filename: str, max_pixels: int, max_bytes: int = DECODE_BYTES
) -> list[Issue]:
    """Check one unlabelled image as a pair's image is checked (the same bounded decode); its issues (none: usable)."""
    member = f"{UNLABELLED}/{filename}"
    try:
        check_file(root / UNLABELLED / filename, max_pixels=max_pixels, max_bytes=max_bytes, as_mask=False)
    except PixelsError as exc:
        return [Issue({"unreadable": "unreadable_image"}.get(exc.kind, exc.kind), member, str(exc))]
    return []


def check_pair(
    root: Path, name: str, image: str, mask: str, max_pixels: int, max_bytes: int = DECODE_BYTES
) -> tuple[Pair | None, list[Issue]]:
    """Decode one pair (after checking each header against ``max_pixels`` and ``max_bytes``), one
    file at a time; the pair or its issues."""
    issues = []
    checks: dict[str, FileCheck] = {}
    for folder, filename, as_mask in (("images", image, False), ("masks", mask, True)):
        member = f"{folder}/{filename}"
        try:
            checks[folder] = check_file(
                root / folder / filename, max_pixels=max_pixels, max_bytes=max_bytes, as_mask=as_mask
            )
        except PixelsError as exc:
            kind = {"unreadable": "unreadable_image"}.get(exc.kind, exc.kind)
            issues.append(Issue(kind, member, str(exc)))
    if issues:
        return None, issues
    isize = (checks["images"].width, checks["images"].height)
    msize = (checks["masks"].width, checks["masks"].height)
    if isize != msize:
        detail = f"size mismatch: the mask is {msize[0]}x{msize[1]}, its image images/{image} is {isize[0]}x{isize[1]}"
        return None, [Issue("size_mismatch", f"masks/{mask}", detail)]
    if mask.lower().endswith((".jpg", ".jpeg")):
        detail = (
            "not a usable mask: JPEG is lossy (edges get grey levels that are no labels); save masks as PNG"
        )
        return None, [Issue("not_label_map", f"masks/{mask}", detail)]
    problem = checks["masks"].mask_problem
    if problem is not None:
        kind = "empty_mask" if problem.startswith("has no foreground") else "not_label_map"
        return None, [Issue(kind, f"masks/{mask}", f"not a usable mask: {problem}")]
    return Pair(name, image, mask, isize[0], isize[1]), []


def _groups(path: Path, names: Sequence[str]) -> tuple[dict[str, str] | None, list[Issue]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, [Issue("pairs_csv", PAIRS_CSV, "not UTF-8 text")]
    try:
        header = csv_header(text)
        if "name" not in header:
            return None, [Issue("pairs_csv", PAIRS_CSV, f"needs a 'name' column (has: {', '.join(header)})")]
        if "group" not in header:
            return None, []
        return read_groups(text, names), []
    except (ValueError, csv.Error) as exc:
        return None, [Issue("pairs_csv", PAIRS_CSV, str(exc))]
