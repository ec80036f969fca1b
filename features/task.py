"""What a photo set asks to predict, in one object every layer reads (as timm's ``pretrained_cfg``
travels with a model): its classes, where each label came from, the submission's format, the metric.

Two classes: every model outputs one number, P(``classes[1]``) (P(dog) on Dogs vs. Cats), and the
metric is log loss on it. K > 2 classes: every model outputs K probabilities per photo, and the
metric is the multi-class log loss, each row clipped and then renormalised as Kaggle scores it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Task:
    """classes: label k is ``classes[k]``; layout: which layout the photos came in; labels_from:
    where each label was read; id_column / columns: the submission's header (id, then one
    probability column, P(classes[1]), for two classes, or one per class); test_order: the test ids
    in the sample submission's order (None: numeric order where every id is a number)."""

    classes: tuple[str, ...]
    layout: str
    labels_from: str
    id_column: str = "id"
    columns: tuple[str, ...] = ("label",)
    test_order: tuple[str, ...] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def cats_and_dogs(self) -> bool:
        """The task the ImageNet prior and the neither-cat-nor-dog check are made for."""
        return self.classes == ("cat", "dog")

    @property
    def metric(self) -> str:
        return f"log loss on P({self.classes[1]})" if self.binary else f"{self.n_classes}-class log loss"

    def with_classes(self, classes) -> "Task":
        """The same task with these classes, and for K > 2 one submission column per class."""
        classes = tuple(classes)
        columns = self.columns if len(classes) == 2 else classes
        return replace(self, classes=classes, columns=columns)

    def describe(self, n_train: int, n_test: int, test_labelled: bool = False) -> str:
        """One line: the layout, the classes and how many photos, e.g.
        ``class folders: 10 classes, 3,409 training photos, no test set``."""
        shown = ", ".join(self.classes[:6]) + (", ..." if self.n_classes > 6 else "")
        test = f"{n_test:,} test photos" if n_test else "no test set"
        test += " (labelled by their class folders: every model is scored on them)" if test_labelled else ""
        return (f"{self.layout}: {self.n_classes} classes ({shown}; labels from {self.labels_from}), "
                f"{n_train:,} training photos, {test}; metric: {self.metric}")


DOGS_VS_CATS = Task(("cat", "dog"), "Kaggle Dogs vs. Cats", "the file-name prefix (cat.N.jpg, dog.N.jpg)")

_NUMBER = re.compile(r"^\d+$")


def id_order_key(photo_id: str) -> tuple:
    """Ids in natural order: ``cat.2`` before ``cat.10``, ``2`` before ``10``, names alphabetical."""
    return tuple((0, int(part), "") if _NUMBER.match(part) else (1, 0, part)
                 for part in re.split(r"([./])", photo_id))
