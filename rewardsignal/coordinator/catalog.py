"""The operator's models file (``--models FILE``): which base models this
coordinator serves. YAML (or JSON), in the shape of the hosted API's
``config/models.yaml``::

    models:
      - name: HuggingFaceTB/SmolLM2-135M   # a Hugging Face id, a built-in, or a path
        revision: main                     # optional
        family: llama                      # optional
        notes: small and fast              # optional

A coordinator with a models file creates runs only on those ids (anything else
is a 400 naming the file), so nobody can make it download and hash arbitrary
weights. Without one it takes any id on loopback; bound to another address it
refuses to start without one (``CoordinatorConfig.check_exposure``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rewardsignal.errors import ValidationError

_FIELDS = ("name", "revision", "family", "notes")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    revision: str | None = None
    family: str | None = None
    notes: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelCatalog:
    path: str
    entries: tuple[ModelEntry, ...]

    def get(self, model_id: str) -> ModelEntry:
        for e in self.entries:
            if e.name == model_id:
                return e
        names = ", ".join(e.name for e in self.entries[:20])
        raise ValidationError(f"base model {model_id!r} is not in this coordinator's models "
                              f"file {self.path} (it serves: {names}); ask its operator to "
                              "add it")


def _entry(raw: object, where: str) -> ModelEntry:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ValidationError(f"{where}: expected a mapping with 'name', got {raw!r}")
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValidationError(f"{where}: unknown field(s) {unknown}; expected {list(_FIELDS)}")
    for key in _FIELDS:
        value = raw.get(key)
        if (key == "name" or value is not None) and not (isinstance(value, str) and value):
            raise ValidationError(f"{where}: '{key}' must be a non-empty string")
    return ModelEntry(raw["name"], raw.get("revision"), raw.get("family"), raw.get("notes"))


def load_catalog(path: str | Path) -> ModelCatalog:
    """Read and check a models file; every error names the file and the entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"models file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml  # PyYAML comes with transformers

            doc = yaml.safe_load(text)
    except Exception as exc:  # YAML and JSON errors alike: say where
        raise ValidationError(f"models file {path} does not parse: {exc}") from None
    items = doc.get("models") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise ValidationError(f"models file {path}: expected a non-empty list under 'models'")
    entries = tuple(_entry(item, f"models file {path}, entry {i + 1}")
                    for i, item in enumerate(items))
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise ValidationError(f"models file {path}: {e.name!r} is listed twice")
        seen.add(e.name)
    return ModelCatalog(str(path), entries)
