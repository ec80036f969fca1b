"""The layouts besides Kaggle Dogs vs. Cats (``features.data``), read without decoding a photo:

- class folders: ``DIR/train/<class>/*`` (and ``DIR/validation/`` or ``val/`` likewise, pooled
  into the training photos), as Keras' ``image_dataset_from_directory`` and torchvision's
  ``ImageFolder`` read them;
- a labels CSV: ``DIR/train.csv`` (or ``labels.csv``, ``train_labels.csv``, or one named) with an id
  and a label column, beside ``DIR/train/<id>.<ext>``, as Kaggle's image competitions ship them.

Either may have ``DIR/test/`` (unlabelled photos; ids = file names without extension) and a
``DIR/sample_submission.csv`` that fixes the submission's columns, the test ids and their order.
Everything wrong with the labels or names is said here, before any photo is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from features.photos import IGNORED, PHOTO_SUFFIXES, DataError, Photo
from features.task import Task, id_order_key

CLASS_FOLDERS, LABELS_CSV = "class folders", "labels CSV"
VALIDATION_SPLITS = ("validation", "val", "valid")  # pooled into the training photos
LABEL_FILES = ("train.csv", "labels.csv", "train_labels.csv")
SAMPLE_SUBMISSION = "sample_submission.csv"


@dataclass
class Layout:
    """One folder read: training photos with their class names (``named``: photo id -> class),
    test photos, and what the folder says of the task (classes fixed by a sample submission, the
    submission's columns). ``load_photos`` pools folders and numbers the classes."""

    kind: str
    train: list[Photo]
    named: dict[str, str]
    test: list[Photo] | None
    task: Task
    test_named: dict[str, str] = field(default_factory=dict)  # a labelled test split: id -> class


def _photos_in(folder: Path) -> list[Path]:
    """Every photo file under ``folder`` (subfolders too), hidden files and other files left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
                  and not any(IGNORED.match(part) for part in p.relative_to(folder).parts))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not IGNORED.match(d.name))


def is_class_folders(data_dir: Path) -> bool:
    """``DIR/train`` holds only folders (one per class), no photo files."""
    train = data_dir / "train"
    if not train.is_dir() or not _subfolders(train):
        return False
    return not any(p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES for p in train.iterdir())


def labels_file(data_dir: Path, given: str | Path | None = None) -> Path | None:
    """The labels CSV of ``data_dir``: the one given, else the first of ``LABEL_FILES`` there."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise DataError(f"--labels {path}: no such file")
        return path
    return next((data_dir / n for n in LABEL_FILES if (data_dir / n).is_file()), None)


def read_class_folders(data_dir: Path) -> Layout:
    """``DIR/train/<class>/*`` (+ ``validation/``): ids ``<split>/<class>/<file name without
    extension>``, unique however the folders repeat names."""
    train, named = [], {}
    for split in ("train", *VALIDATION_SPLITS):
        folder = data_dir / split
        if not folder.is_dir():
            continue
        loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES]
        if loose:
            raise DataError(f"{folder}: photo files ({', '.join(sorted(loose)[:3])}) beside class folders; "
                            "in a class-folder layout every photo is inside its class's folder")
        for class_dir in _subfolders(folder):
            files = _photos_in(class_dir)
            if not files:
                raise DataError(f"{class_dir}: a class folder with no photos")
            for f in files:
                pid = f"{split}/{class_dir.name}/{f.relative_to(class_dir).with_suffix('').as_posix()}"
                if pid in named:
                    raise DataError(f"{f}: a second photo named '{pid}' (another extension?)")
                train.append(Photo(pid, -1, str(f), None, f.stat().st_size))
                named[pid] = class_dir.name
    sample = read_sample_submission(data_dir)
    classes = tuple(sorted(set(named.values())))
    task = Task(classes, CLASS_FOLDERS, "the class folder names").with_classes(classes)
    task, test = _test_and_format(data_dir, task, sample)
    test, test_named = labelled_test(data_dir / "test", test, task.classes, renamed=sample is None)
    return Layout(CLASS_FOLDERS, train, named, test, task, test_named)


def labelled_test(folder: Path, test: list[Photo] | None, classes: tuple[str, ...],
                  renamed: bool = True) -> tuple[list[Photo] | None, dict[str, str]]:
    """(test photos, {test id: class}) where ``DIR/test/`` is itself class folders (every photo in
    a folder named for a training class, as a dataset's own test split comes): the run then
    scores every model on it. ``renamed``: ids become the file names without extension, as an
    unlabelled test split's are, so the label is not in the id (kept ``<class>/<name>`` where two
    classes hold one name, or where a sample submission named them). Else (test, {})."""
    if test is None or any(p.is_file() for p in folder.iterdir() if not IGNORED.match(p.name)):
        return test, {}
    sub = _subfolders(folder)
    parts = [Path(p.id).parts for p in test]
    if not sub or not {d.name for d in sub} <= set(classes) or any(len(x) != 2 for x in parts):
        return test, {}
    names = [x[1] for x in parts]
    if renamed and len(set(names)) == len(names):
        test = sorted((replace(p, id=n) for p, n in zip(test, names)), key=lambda p: id_order_key(p.id))
        return test, {n: x[0] for n, x in zip(names, parts)}
    return test, {p.id: x[0] for p, x in zip(test, parts)}


def read_labels_csv(data_dir: Path, path: Path) -> Layout:
    """``path`` (an id and a label column) beside ``DIR/train/<id>.<ext>``: every id needs a photo
    and every photo a label."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    id_col, label_col = _id_and_label_columns(path, list(table.columns))
    ids, labels = table[id_col].str.strip(), table[label_col].str.strip()
    if ids.duplicated().any():
        raise DataError(f"{path}: id '{ids[ids.duplicated()].iloc[0]}' appears twice")
    if (labels == "").any():
        raise DataError(f"{path}: id '{ids[labels == ''].iloc[0]}' has no label")
    folder = data_dir / "train"
    if not folder.is_dir():
        raise DataError(f"{data_dir}: {path.name} is here but there is no train/ folder of its photos")
    files = _photos_in(folder)
    by_name = _files_by_id(files, folder, ids.tolist())
    missing = [i for i in ids if i not in by_name]
    if missing:
        raise DataError(f"{path}: {len(missing)} id(s) without a photo in {folder} "
                        f"(e.g. {', '.join(missing[:3])})")
    unlabelled = sorted(set(map(str, files)) - {str(by_name[i]) for i in ids})
    if unlabelled:
        raise DataError(f"{folder}: {len(unlabelled)} photo(s) without a label in {path.name} "
                        f"(e.g. {', '.join(Path(u).name for u in unlabelled[:3])})")
    train = [Photo(i, -1, str(by_name[i]), None, by_name[i].stat().st_size) for i in ids]
    named = dict(zip(ids, labels))
    sample = read_sample_submission(data_dir)
    classes = tuple(sorted(set(labels), key=id_order_key))
    task = Task(classes, LABELS_CSV, f"{path.name} column '{label_col}'", id_column=id_col,
                columns=(label_col,)).with_classes(classes)
    task, test = _test_and_format(data_dir, task, sample)
    return Layout(LABELS_CSV, train, named, test, task)


def _id_and_label_columns(path: Path, columns: list[str]) -> tuple[str, str]:
    """The id column ('id', else the first) and the label column (the only other one, else 'label')."""
    if len(columns) < 2:
        raise DataError(f"{path}: needs an id column and a label column; has {', '.join(columns) or 'none'}")
    id_col = "id" if "id" in columns else columns[0]
    rest = [c for c in columns if c != id_col]
    if len(rest) == 1:
        return id_col, rest[0]
    if "label" in rest:
        return id_col, "label"
    raise DataError(f"{path}: which column is the label? It has {', '.join(columns)}; "
                    "name it 'label' or keep only the id and label columns")


def _files_by_id(files: list[Path], folder: Path, wanted: list[str]) -> dict[str, Path]:
    """{id: file} where each id is a file's name, or its name without extension (as the ids in
    ``wanted`` are written); two files answering to one id is an error."""
    with_ext = bool(wanted) and all(Path(i).suffix.lower() in PHOTO_SUFFIXES for i in wanted)
    found: dict[str, Path] = {}
    for f in files:
        key = f.relative_to(folder).as_posix()
        key = key if with_ext else str(Path(key).with_suffix(""))
        if key in found:
            raise DataError(f"{folder}: two photos named '{key}' ({found[key].name} and {f.name})")
        found[key] = f
    return found


def read_sample_submission(data_dir: Path):
    """``DIR/sample_submission.csv`` as a table of strings, or None."""
    path = data_dir / SAMPLE_SUBMISSION
    if not path.is_file():
        return None
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if len(table.columns) < 2:
        raise DataError(f"{path}: needs an id column and at least one more; has {', '.join(table.columns)}")
    if table.iloc[:, 0].duplicated().any():
        raise DataError(f"{path}: id '{table.iloc[:, 0][table.iloc[:, 0].duplicated()].iloc[0]}' appears twice")
    table.attrs["path"] = str(path)
    return table


def _test_and_format(data_dir: Path, task: Task, sample) -> tuple[Task, list[Photo] | None]:
    """The test photos (``DIR/test/``) and the submission's format: the sample submission's, where
    there is one (its columns are the classes, or one column for two classes: P(classes[1])), else
    ``task``'s own (id, then a column per class, or the label column for two classes)."""
    if sample is not None:
        where = sample.attrs["path"]
        id_col, columns = sample.columns[0], tuple(sample.columns[1:])
        if len(columns) > 1:  # one probability column per class, in the competition's order
            unknown = sorted(set(task.classes) - set(columns))
            if unknown:
                raise DataError(f"{where}: the classes {', '.join(unknown[:5])} have no column there "
                                f"(its columns: {', '.join(columns[:6])}{', ...' if len(columns) > 6 else ''})")
            task = replace(task, classes=columns)
        # One column: P(classes[1]) for two classes, else the predicted class's name (Plant Seedlings).
        task = replace(task, id_column=id_col, columns=columns)
    folder = data_dir / "test"
    if not folder.is_dir():
        if sample is not None:
            raise DataError(f"{sample.attrs['path']}: names {len(sample)} test photos but {folder} does not exist")
        return task, None
    files = _photos_in(folder)
    if not files:
        raise DataError(f"{folder}: no photos in the test split")
    wanted = sample.iloc[:, 0].tolist() if sample is not None else []
    by_name = _files_by_id(files, folder, wanted)
    if sample is not None:
        missing = [i for i in wanted if i not in by_name]
        if missing:
            raise DataError(f"{sample.attrs['path']}: {len(missing)} test id(s) without a photo in {folder} "
                            f"(e.g. {', '.join(missing[:3])})")
        extra = sorted(set(by_name) - set(wanted))
        if extra:
            raise DataError(f"{folder}: {len(extra)} photo(s) the sample submission does not name, so "
                            f"their rows could not be placed (e.g. {', '.join(extra[:3])})")
        task = replace(task, test_order=tuple(wanted))
    test = [Photo(i, -1, str(f), None, f.stat().st_size) for i, f in by_name.items()]
    return task, sorted(test, key=lambda p: id_order_key(p.id))
