"""The synthesis prompt library: nine Markdown templates, each with an id and a content hash.

Eight chain-of-thought templates follow human education stages (grade school → AIME) and one
tool template asks for a Python program whose printed output is the answer. Each file in
``prompts/`` starts with a small front matter (``id``, ``kind``, ``stage``, ``title``,
``excerpt_chars``) followed by the prompt body holding one ``{{excerpt}}`` placeholder. The hash
is the sha256 of the whole file, so any wording change gives new ledger keys (a reworded prompt
is a different request and is paid for again, on purpose).

Stage choice per document is deterministic: a RNG seeded with ``(seed, doc_id)`` picks one
stage, so reruns and shards agree without coordination; sources listed in
``prompts.all_stages_sources`` get every stage instead. A document also gets the tool template
when its own seeded draw falls under ``prompts.tool_fraction``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from jzlake.lineage import stable_hash

if TYPE_CHECKING:
    from jzlake.settings import PromptSettings

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
PLACEHOLDER = "{{excerpt}}"
COT_TEMPLATE_IDS: tuple[str, ...] = (
    "cot_grade_school", "cot_middle_school", "cot_high_school", "cot_college",
    "cot_amc8", "cot_amc10", "cot_amc12", "cot_aime",
)
TOOL_TEMPLATE_ID = "tool_code"

Kind = Literal["cot", "tool"]


@dataclass(frozen=True)
class PromptTemplate:
    """One template file: metadata from the front matter, the body, and the file's sha256."""

    id: str
    kind: Kind
    stage: str
    title: str
    excerpt_chars: int
    body: str
    sha256: str
    path: str

    def render(self, excerpt: str) -> tuple[tuple[str, str], ...]:
        """Chat messages (role, content) with ``excerpt`` in place of the placeholder."""
        if not excerpt.strip():
            raise ValueError(f"template {self.id}: refusing to render an empty excerpt")
        # str.replace (not str.format): excerpts are full of LaTeX braces.
        return (("user", self.body.replace(PLACEHOLDER, excerpt.strip())),)


def parse_template(text: str, path: str = "<string>") -> PromptTemplate:
    """Parse one template file's text; errors name the file, the rule and the fix."""
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: a template must start with a '---' front matter block")
    head, sep, body = text[4:].partition("\n---\n")
    if not sep:
        raise ValueError(f"{path}: front matter is not closed by a '---' line")
    meta = yaml.safe_load(head) or {}
    missing = [k for k in ("id", "kind", "stage", "title", "excerpt_chars") if k not in meta]
    if missing:
        raise ValueError(f"{path}: front matter lacks {missing}")
    if meta["kind"] not in ("cot", "tool"):
        raise ValueError(f"{path}: kind must be 'cot' or 'tool', got {meta['kind']!r}")
    if body.count(PLACEHOLDER) != 1:
        raise ValueError(f"{path}: the body must hold the placeholder {PLACEHOLDER} exactly once")
    return PromptTemplate(
        id=str(meta["id"]), kind=meta["kind"], stage=str(meta["stage"]), title=str(meta["title"]),
        excerpt_chars=int(meta["excerpt_chars"]), body=body.lstrip("\n"),
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), path=path,
    )


@lru_cache(maxsize=8)
def _load_dir(directory: str) -> dict[str, PromptTemplate]:
    templates: dict[str, PromptTemplate] = {}
    for path in sorted(Path(directory).glob("*.md")):
        template = parse_template(path.read_text(encoding="utf-8"), str(path))
        if template.id != path.stem:
            raise ValueError(f"{path}: front matter id {template.id!r} must equal the file name")
        templates[template.id] = template
    return templates


def load_templates(directory: str | Path | None = None) -> dict[str, PromptTemplate]:
    """All templates in ``directory`` (default: the packaged ``prompts/``), by id."""
    templates = _load_dir(str(Path(directory or PROMPTS_DIR).resolve()))
    if not templates:
        raise FileNotFoundError(f"no *.md templates in {directory or PROMPTS_DIR}")
    return dict(templates)


def templates_for(settings: PromptSettings, home: str | None = None) -> dict[str, PromptTemplate]:
    """The templates the settings point at (``prompts.templates_dir`` or the packaged ones)."""
    directory = settings.templates_dir
    if directory and home and not Path(directory).is_absolute():
        directory = str(Path(home) / directory)
    templates = load_templates(directory)
    unknown = [t for t in settings.stages if t not in templates]
    if unknown:
        raise ValueError(f"prompts.stages names unknown templates {unknown}; known: {sorted(templates)}")
    return templates


def seeded_rng(seed: int, doc_id: str, purpose: str) -> random.Random:
    """A RNG that depends only on (seed, doc_id, purpose): stable across runs and shards."""
    return random.Random(int(stable_hash(seed, doc_id, purpose, length=16), 16))


def choose_template_ids(doc_id: str, source: str | None, settings: PromptSettings) -> list[str]:
    """Template ids for one document: its CoT stage(s), then ``tool_code`` if drawn."""
    stages = list(settings.stages)
    if settings.stage_selection == "all" or (source and source in settings.all_stages_sources):
        chosen = stages
    else:
        chosen = [seeded_rng(settings.seed, doc_id, "stage").choice(stages)] if stages else []
    if settings.tool_fraction > 0 and seeded_rng(settings.seed, doc_id, "tool").random() < settings.tool_fraction:
        chosen.append(TOOL_TEMPLATE_ID)
    return chosen
